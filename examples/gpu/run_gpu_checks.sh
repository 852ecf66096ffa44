#!/usr/bin/env bash
# Every check that needs a GPU (one H100/H200), in one call or part by part; figures go to ${OUT:-gpu_results}/.
#
#   bash examples/gpu/run_gpu_checks.sh                       # all parts, in this order
#   bash examples/gpu/run_gpu_checks.sh tests loss-kernel     # some of them
#
# Parts (each under its own time limit, so that one that hangs leaves time and figures for the rest):
#   tests        the gpu-marked tests: compiled Triton kernel, the memory-budget backward, TE-spec GPT and LLaMA
#                trained in BF16 and each FP8 recipe this GPU runs                                  (~2 min)
#   loss-kernel  fused loss (default and memory-budget backward) against materialised logits and
#                cut-cross-entropy, bf16, 8192 x 32000 x 2048 and 8192 x 128256 x 4096: ms and peak MB (~2 min)
#   throughput   tokens/s and MFU of the ~1B LLaMA, BF16 and FP8, with and without TempNet         (~4 min)
#   curves       FP8 vs BF16 loss curves of the ~125M GPT over 200 steps (goal: within 2%)          (~3 min)
# Needs torch with CUDA and triton; megatron-core, cut-cross-entropy and Transformer Engine installed by the
# recipe in README.md (or by pip where there is network). Without TE the FP8 rows and curves are skipped.
set -uo pipefail
source "$(dirname "$0")/env.sh"
cd "$repo"
out="${OUT:-gpu_results}"
mkdir -p "$out"
export MASTER_PORT=${MASTER_PORT:-29541}
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(tests loss-kernel throughput curves)
for p in "${parts[@]}"; do  # every part name checked before any part runs
  case "$p" in tests|loss-kernel|throughput|curves) ;; *)
    echo "refused: unknown part '$p'; choose from tests, loss-kernel, throughput, curves" >&2; exit 2 ;; esac
done
have_te=$($PY -c "import transformer_engine.pytorch" >/dev/null 2>&1 && echo 1 || echo 0)
echo "transformer_engine importable: $have_te" | tee -a "$out/summary.txt"

part() {  # part NAME SECONDS LOGFILE COMMAND...: run under a time limit, log to $out, one summary line
  local name=$1 limit=$2 log=$3 start rc
  shift 3
  echo "== $name (limit ${limit} s)"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$log"
  rc=${PIPESTATUS[0]}
  echo "$name: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"
}

for p in "${parts[@]}"; do
  case "$p" in
    tests)
      part tests 240 gpu_tests.log $PY -m pytest -q -m gpu tests -p no:cacheprovider ;;
    loss-kernel)
      shapes=8192x32000x2048,8192x128256x4096
      part loss-kernel 200 loss_kernel.jsonl $PY benchmarks/loss_kernel.py --device cuda --dtype bfloat16 \
        --shapes $shapes --kinds loss --methods reference,triton,triton-lowmem,cce --repeats 5 --backward-memory-mib 32
      part loss-kernel-8mib 60 loss_kernel_8mib.jsonl $PY benchmarks/loss_kernel.py --device cuda --dtype bfloat16 \
        --shapes $shapes --kinds loss --methods triton-lowmem --filter-eps "" --repeats 5 --backward-memory-mib 8 ;;
    throughput)
      part throughput 300 throughput.jsonl $PY benchmarks/train_throughput.py --config examples/configs/llama_1b.yaml \
        --precision bf16 $([ "$have_te" = 1 ] && echo --fp8) --steps 8 --warmup 3 ;;
    curves)
      if [ "$have_te" = 1 ]; then
        part curves 300 fp8_vs_bf16.json $PY examples/gpu/fp8_vs_bf16.py --config examples/configs/gpt_125m.yaml \
          --train-iters 200
      else
        echo '{"fp8_vs_bf16": "skipped: Transformer Engine is not installed"}' | tee "$out/fp8_vs_bf16.json"
      fi ;;
    *)
      echo "refused: unknown part '$p'; choose from tests, loss-kernel, throughput, curves" >&2
      exit 2 ;;
  esac
done
