#!/usr/bin/env bash
# Step 4 (GPU machine, after every piece has arrived): join the TE core wheel, compile the PyTorch extension
# from its sdist against this machine's torch, install the three TE packages into .gpu-site in one go (they
# share the transformer_engine/ folder), and smoke-test FP8. A wheel built earlier in .gpu-wheels/built is
# reused. The built wheel is copied to $OUT so that it can be kept and carried next time instead of rebuilt.
#   bash examples/gpu/build_te.sh
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$repo"
$PY examples/gpu/wheel_pieces.py join --root "$GPU_WHEELS" --out "$GPU_WHEELS/joined"
built="$GPU_WHEELS/built"
if ! ls "$built"/transformer_engine_torch-*.whl >/dev/null 2>&1; then
  build_env=$($PY examples/gpu/te_build_env.py) || exit 1  # its one-line refusal is already on stderr
  eval "$build_env"  # CUDA_HOME, CPLUS_INCLUDE_PATH, NVTE_*, MAX_JOBS (see that file)
  src=$(mktemp -d /tmp/te-torch-src.XXXXXX)  # outside this git repository: no "+commit" in the version
  tar xzf "$GPU_WHEELS"/small/transformer_engine_torch-*.tar.gz -C "$src"
  start=$(date +%s)
  $PY -m pip wheel --no-index --no-deps --no-build-isolation -w "$built" "$src"/transformer_engine_torch-*/ \
    > "$GPU_WHEELS/build.log" 2>&1 || { tail -30 "$GPU_WHEELS/build.log"; echo "refused: the TE extension did not build (log above)"; exit 1; }
  echo "transformer-engine-torch built in $(( $(date +%s) - start )) s with MAX_JOBS=$MAX_JOBS"
fi
$PY -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --upgrade --target "$GPU_SITE" \
  "$GPU_WHEELS"/joined/transformer_engine_cu13-*.whl "$GPU_WHEELS"/small/transformer_engine-*.whl \
  "$built"/transformer_engine_torch-*.whl
if [ -n "${OUT:-}" ]; then
  for w in "$built"/*.whl; do [ "$(stat -c %s "$w")" -lt $((16 * 2**20)) ] && cp "$w" "$OUT/"; done
  sha256sum "$built"/*.whl | tee "$OUT/te_torch_wheel.sha256"
fi
$PY examples/gpu/te_smoke.py
