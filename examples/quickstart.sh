#!/usr/bin/env bash
# The whole stack on a fresh machine, on the embedded corpus (the Python standard library's own source):
# set up, train a tokenizer, preprocess into shards, train a small LLaMA with TempNet at TP=2 on 2 ranks,
# compare validation perplexity with the untrained model's, print a generated sample, leave TensorBoard logs.
#
#   bash examples/quickstart.sh            # ~10 minutes on 2 CPU cores
#   QUICKSTART_ITERS=100 bash examples/quickstart.sh   # shorter
#
# Everything goes to runs/quickstart/ (reruns reuse the corpus, tokenizer and shards).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/tools/setup_env.sh"
cd "$repo"
out="${QUICKSTART_DIR:-runs/quickstart}"
iters="${QUICKSTART_ITERS:-400}"
mkdir -p "$out"

echo "== 1/5 embedded corpus: the Python standard library"
[ -f "$out/stdlib.jsonl" ] || python tools/build_stdlib_corpus.py --output "$out/stdlib.jsonl"

echo "== 2/5 tokenizer (sentencepiece BPE, 4096 pieces)"
[ -f "$out/tok.model" ] || python tools/train_tokenizer.py --input "$out/stdlib.jsonl" --model-prefix "$out/tok" \
  --vocab-size 4096 --threads 2

echo "== 3/5 preprocess into 2 shards of Megatron .bin/.idx"
python tools/preprocess_data.py --input "$out/stdlib.jsonl" --tokenizer-model "$out/tok.model" \
  --output-prefix "$out/data/stdlib" --append-eod --workers 2 --shards 2

echo "== 4/5 train a small LLaMA with TempNet, TP=2 on 2 CPU ranks ($iters iterations)"
rm -rf "$out/ckpt" "$out/tb"
torchrun --nproc_per_node 2 --master_port "${MASTER_PORT:-29517}" -m megatron_tempnet.train \
  --config examples/configs/quickstart_llama.yaml \
  --data-path "$out/data/stdlib.manifest.json" --tokenizer-model "$out/tok.model" \
  --data-cache-path "$out/index-cache" --train-iters "$iters" --eval-at-start \
  --save "$out/ckpt" --tensorboard-dir "$out/tb" 2>&1 | grep --line-buffered -v -i "warn" | tee "$out/train.log"

python - "$out/train.log" <<'PY'
import re, sys
evals = re.findall(r"^\[valid\] iter (\d+) \| loss \S+ \| ppl \(tau=1\) ([\d.]+)", open(sys.argv[1]).read(), re.M)
(first_it, untrained), (last_it, trained) = evals[0], evals[-1]
print(f"validation perplexity: untrained (iter {first_it}) {float(untrained):.1f} -> trained (iter {last_it}) {float(trained):.1f}")
PY

echo "== 5/5 a sample, with each token's TempNet temperature"
python -m megatron_tempnet.generate --load "$out/ckpt" --tokenizer-model "$out/tok.model" \
  --prompt "def fibonacci(n):" --max-new-tokens 48 --top-k 20 --seed 0 --print-tau 2>&1 | grep -v -i "warn"

echo "TensorBoard logs: tensorboard --logdir $out/tb"
