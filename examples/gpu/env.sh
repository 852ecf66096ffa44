# Sourced by every step on the GPU machine: the packages installed by the recipe (.gpu-site, git-ignored, kept
# between calls while the machine stays up) and this checkout on the import path.
#   source examples/gpu/env.sh
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export GPU_SITE="$repo/.gpu-site" GPU_WHEELS="$repo/.gpu-wheels"
export PYTHONPATH="$GPU_SITE:$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# With TE installed, a missing PyTorch extension is an error at import, not a warning.
export NVTE_FRAMEWORK=pytorch
PY=${PY:-python3}
