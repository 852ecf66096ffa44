#!/usr/bin/env bash
# Every check that needs a GPU, in one go on a single GPU (H100/H200). Writes its figures to ${OUT:-gpu_results}/.
#   bash examples/gpu/run_gpu_checks.sh
# Needs: torch with CUDA, triton, megatron-core 0.16.1 (pip install -e .), and for the FP8 rows Transformer
# Engine (pip install -e .[gpu]); without TE the FP8 steps are reported as skipped and the rest still runs.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-gpu_results}"; mkdir -p "$out"
export PYTHONUNBUFFERED=1 MASTER_PORT=${MASTER_PORT:-29541}
have_te=$(python -c "import transformer_engine" 2>/dev/null && echo 1 || echo 0)

echo "== gpu-marked tests (compiled Triton kernel, FP8 layers)"
python -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu_tests.log" | tail -5

echo "== fused loss kernel vs cut-cross-entropy (tau = 1) and the reference"
python benchmarks/loss_kernel.py --device cuda --dtype bfloat16 --grid gpu --repeats 5 | tee "$out/loss_kernel.jsonl"

echo "== throughput of a ~1B LLaMA on one GPU (BF16$( [ "$have_te" = 1 ] && echo ' and FP8'))"
python benchmarks/train_throughput.py --config examples/configs/llama_1b.yaml --precision bf16 \
  $( [ "$have_te" = 1 ] && echo --fp8 ) --steps 10 --warmup 3 | tee "$out/throughput.jsonl"

if [ "$have_te" = 1 ]; then
  echo "== FP8 vs BF16 loss curves, 200 steps of a ~125M GPT"
  python examples/gpu/fp8_vs_bf16.py --config examples/configs/gpt_125m.yaml --train-iters 200 | tee "$out/fp8_vs_bf16.json"
else
  echo '{"fp8_vs_bf16": "skipped: Transformer Engine is not installed"}' | tee "$out/fp8_vs_bf16.json"
fi
