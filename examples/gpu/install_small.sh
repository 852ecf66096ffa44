#!/usr/bin/env bash
# Step 2 (GPU machine, first call; carry .gpu-wheels/small): check the small files against the manifest, install
# the wheels the machine lacks into .gpu-site (megatron-core, cut-cross-entropy, pydantic...; TE's own are
# installed with its core wheel in build_te.sh), and report what the TE build will compile against.
#   bash examples/gpu/install_small.sh
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$repo"
$PY examples/gpu/wheel_pieces.py check-files --dir "$GPU_WHEELS/small" >/dev/null
mkdir -p "$GPU_SITE"
ln -sfn "$repo/kernels" "$GPU_SITE/tempnet_kernels"  # setup.py maps kernels/ to this package name
need=()
for wheel in "$GPU_WHEELS"/small/*.whl; do
  dist=$(basename "$wheel" | cut -d- -f1)
  case "$dist" in transformer_engine*) continue ;; esac
  $PY -c "import importlib.metadata as m, sys; m.distribution(sys.argv[1])" "$dist" 2>/dev/null || need+=("$wheel")
done
if [ ${#need[@]} -gt 0 ]; then
  $PY -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --target "$GPU_SITE" "${need[@]}"
fi
echo "installed into .gpu-site: ${need[*]##*/}"
$PY -c "import megatron.core, cut_cross_entropy, pydantic, tempnet_kernels.dro_cce; print('imports: megatron-core', megatron.core.__version__, '| cut-cross-entropy, pydantic, tempnet_kernels ok')"
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader
$PY examples/gpu/te_build_env.py --report
