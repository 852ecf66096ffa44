#!/usr/bin/env bash
# Step 1 (on a machine with network, not the GPU machine): download the exact files the GPU machine needs for
# Transformer Engine, check each against the sha256 PyPI publishes, and cut the large wheel into pieces.
#
#   bash examples/gpu/download_wheels.sh
#
# Writes (all git-ignored): .gpu-wheels/dl/ (every download), .gpu-wheels/small/ (the files that travel in one
# transfer), .gpu-wheels/part-NN/ (one piece of the TE core wheel each, one transfer each). Updates the tracked
# manifest examples/gpu/wheels.json (published sha256 of every file, size and sha256 of every piece).
#
# Versions: megatron-core 0.16.1 accepts Transformer Engine >= 2.9, < 2.12; 2.11.0 is the newest of those.
# The GPU machine has Python 3.12, torch 2.11 + CUDA 13: hence transformer-engine-cu13 and cp312 wheels.
set -euo pipefail
cd "$(dirname "$0")/../.."
TE=2.11.0
root=.gpu-wheels
dl=$root/dl
mkdir -p "$dl" "$root/reports"
py=${PYTHON:-python3}
plat=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64)
# Binary wheels, pinned: the TE core library, TE's meta package (transformer_engine reads its own version from
# it), megatron-core, cut-cross-entropy (the loss kernel's comparison), and pydantic with its dependencies (TE's
# recipes import it; the GPU image lacks it). Everything else TE and its build need is in that image
# (einops, wheel, packaging, pybind11, nvidia-cudnn-cu13, nvidia-nccl-cu13; see examples/gpu/README.md).
binaries=(transformer-engine-cu13==$TE transformer-engine==$TE megatron-core==0.16.1 cut-cross-entropy==25.1.1
          pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5)
"$py" -m pip download -q --no-deps --only-binary=:all: "${plat[@]}" -d "$dl" "${binaries[@]}"
# The published sha256 of each: pip's resolution report carries the hash of PyPI's index link.
"$py" -m pip install -q --dry-run --ignore-installed --no-deps --only-binary=:all: "${plat[@]}" \
  --target "$root/reports/unused" --report "$root/reports/binaries.json" "${binaries[@]}"

# transformer-engine-torch is source only. pip prepares an sdist's metadata even to download it, and this
# setup.py imports torch and parses torch.version.cuda, which a CPU torch leaves None. So the download runs in a
# throw-away venv that sees this project's CPU torch and reports CUDA 13.0 to that setup.py. Only the metadata
# step sees the stand-in: the file saved is PyPI's, checked against its published sha256 below.
src_venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$src_venv")"' EXIT
"$py" -m venv "$src_venv"
"$src_venv/bin/pip" install -q setuptools wheel packaging
torch_site=$(${TORCH_PYTHON:-.venv/bin/python} -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
site=$("$src_venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$torch_site" > "$site/zz_cpu_torch.pth"
cat > "$site/sitecustomize.py" <<'EOF'
import os
if os.environ.get("SDIST_METADATA_CUDA"):
    import torch.version
    torch.version.cuda = os.environ["SDIST_METADATA_CUDA"]
EOF
export SDIST_METADATA_CUDA=13.0
"$src_venv/bin/pip" download -q --no-deps --no-binary=:all: --no-build-isolation -d "$dl" transformer-engine-torch==$TE
"$src_venv/bin/pip" install -q --dry-run --ignore-installed --no-deps --no-binary=:all: --no-build-isolation \
  --report "$root/reports/sdist.json" transformer-engine-torch==$TE
unset SDIST_METADATA_CUDA

"$py" examples/gpu/wheel_pieces.py record --dir "$dl" --report "$root/reports/binaries.json" --report "$root/reports/sdist.json"
rm -rf "$root"/part-* "$root/small"
"$py" examples/gpu/wheel_pieces.py split --dir "$dl" --root "$root" --max-mib 58
mkdir -p "$root/small"
big=$(ls -S "$dl" | head -1)
for f in "$dl"/*; do [ "$(basename "$f")" = "$big" ] || cp "$f" "$root/small/"; done
"$py" examples/gpu/wheel_pieces.py check-files --dir "$root/small" >/dev/null
du -sh "$root"/small "$root"/part-*
