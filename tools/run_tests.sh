#!/usr/bin/env bash
# Run the test suite (CPU; GPU-marked tests are skipped without CUDA). Extra args go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/tools/setup_env.sh"
cd "$repo"
exec python -m pytest -q "$@"
