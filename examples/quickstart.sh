#!/usr/bin/env bash
# The whole stack on a fresh machine, on the embedded corpus (the Python standard library's own source):
# set up, train a tokenizer, preprocess into shards, train a small LLaMA at TP=2 on 2 ranks, then a TempNet on
# the frozen LM with the DRO loss (the TempNet recipe, README), print a sample with each token's temperature,
# write it shaded by temperature (HTML and PNG), leave TensorBoard logs.
#
#   bash examples/quickstart.sh                                        # under 10 minutes on 2 CPU cores
#   QUICKSTART_ITERS=100 QUICKSTART_TEMPNET_ITERS=60 bash examples/quickstart.sh   # shorter
#
# Everything goes to runs/quickstart/ (QUICKSTART_DIR; reruns reuse the corpus, tokenizer and shards).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/tools/setup_env.sh"
cd "$repo"
out="${QUICKSTART_DIR:-runs/quickstart}"
iters="${QUICKSTART_ITERS:-300}"
tempnet_iters="${QUICKSTART_TEMPNET_ITERS:-200}"
port="${MASTER_PORT:-29517}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # one thread per rank on 2 cores (torchrun's default, said without its banner)
mkdir -p "$out"
data=(--data-path "$out/data/stdlib.manifest.json" --tokenizer-model "$out/tok.model" --data-cache-path "$out/index-cache")

echo "== 1/6 embedded corpus: the Python standard library"
[ -f "$out/stdlib.jsonl" ] || python tools/build_stdlib_corpus.py --output "$out/stdlib.jsonl"

echo "== 2/6 tokenizer (sentencepiece BPE, 4096 pieces)"
[ -f "$out/tok.model" ] || python tools/train_tokenizer.py --input "$out/stdlib.jsonl" --model-prefix "$out/tok" \
  --vocab-size 4096 --threads 2

echo "== 3/6 preprocess into 2 shards of Megatron .bin/.idx"
python tools/preprocess_data.py --input "$out/stdlib.jsonl" --tokenizer-model "$out/tok.model" \
  --output-prefix "$out/data/stdlib" --append-eod --workers 2 --shards 2

echo "== 4/6 train a small LLaMA with cross-entropy, TP=2 on 2 CPU ranks ($iters iterations)"
rm -rf "$out/lm" "$out/ckpt" "$out/tb"
torchrun --nproc_per_node 2 --master_port "$port" -m megatron_tempnet.train \
  --config examples/configs/quickstart_llama.yaml --no-tempnet-enabled "${data[@]}" --train-iters "$iters" \
  --eval-at-start --save "$out/lm" --tensorboard-dir "$out/tb/lm" 2>&1 | tee "$out/train_lm.log"

echo "== 5/6 train TempNet on the frozen LM with the DRO loss, TP=2 ($tempnet_iters iterations)"
torchrun --nproc_per_node 2 --master_port "$port" -m megatron_tempnet.train \
  --config examples/configs/quickstart_llama.yaml --mode frozen_lm --pretrained-checkpoint "$out/lm" "${data[@]}" \
  --train-iters "$tempnet_iters" --eval-at-start --save "$out/ckpt" --tensorboard-dir "$out/tb/tempnet" 2>&1 \
  | tee "$out/train_tempnet.log"

python - "$out/train_lm.log" "$out/train_tempnet.log" <<'PY'
import re, sys
lm, tn = (open(p).read() for p in sys.argv[1:])
ppl = re.findall(r"^\[valid\] iter (\d+) \| loss \S+ \| ppl \(tau=1\) ([\d.]+)", lm, re.M)
print(f"validation perplexity of the LM: untrained {float(ppl[0][1]):.1f} -> trained (iter {ppl[-1][0]}) {float(ppl[-1][1]):.1f}")
diag = re.findall(r"^\[valid\] iter (\d+) \| tau per token: std ([\d.]+) .*Spearman\(tau, tau\*\) (\S+)", tn, re.M)
(i0, s0, _), (i1, s1, r1) = diag[0], diag[-1]
print(f"TempNet's per-token tau std on validation tokens: {float(s0):.4f} (iter {i0}) -> {float(s1):.4f} (iter {i1}); "
      f"Spearman(tau, per-token DRO optimum tau*) {r1}")
PY

echo "== 6/6 a sample, with each token's TempNet temperature, and the same sample shaded by it"
sample=(--load "$out/ckpt" --tokenizer-model "$out/tok.model" --prompt "def fibonacci(n):" --max-new-tokens 48
        --top-k 20 --seed 0)
python -m megatron_tempnet.generate "${sample[@]}" --print-tau
python tools/shade_tokens.py "${sample[@]}" --html "$out/sample.html" --png "$out/sample.png"

echo "shaded sample: $out/sample.html, $out/sample.png; TensorBoard logs: tensorboard --logdir $out/tb"
