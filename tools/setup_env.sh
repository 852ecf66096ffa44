#!/usr/bin/env bash
# Make (or reuse) the project's virtual environment and install what it needs.
#
#   source tools/setup_env.sh        # then `python` is the venv's
#
# On a machine without an NVIDIA GPU it installs the CPU build of torch 2.13.0 first, so pip never
# pulls a multi-GB CUDA build. Set TEMPNET_VENV to put the environment elsewhere (default: .venv).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TEMPNET_VENV:-$repo/.venv}"
stamp="$venv/.tempnet-installed"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment at $venv"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"

# Reinstall only when setup.py changed since the last successful install.
if [ ! -f "$stamp" ] || [ "$repo/setup.py" -nt "$stamp" ]; then
  pip_q=(-q --disable-pip-version-check)
  if ! "$py" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      echo "[setup] installing torch (CUDA machine)"
      "$py" -m pip install "${pip_q[@]}" torch
    else
      echo "[setup] installing torch==2.13.0 (CPU build)"
      "$py" -m pip install "${pip_q[@]}" torch==2.13.0
    fi
  fi
  echo "[setup] installing megatron-tempnet and its dev tools"
  "$py" -m pip install "${pip_q[@]}" -e "$repo[dev]" 2>&1 | grep -v "^WARNING: Location" || true
  "$py" -c "import torch, megatron.core, megatron_tempnet" || { echo "[setup] install failed" >&2; exit 1; }
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
set +euo pipefail
