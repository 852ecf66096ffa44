"""Where the GPU machine keeps what Transformer Engine's PyTorch extension compiles against, as shell exports.

    eval "$(python3 examples/gpu/te_build_env.py)"      # or --report: one line per finding, no exports

What the transformer-engine-torch 2.11.0 sdist's build does (read from its setup.py and build_tools/):

* It is a torch CppExtension: 28 C++ files, no CUDA sources, so nvcc only reports the CUDA version; g++ does
  the work, MAX_JOBS (or NVTE_BUILD_MAX_JOBS) jobs at a time through ninja.
* CUDA headers: CUDA_HOME/include if CUDA_HOME is set, else the folder of the nvcc on PATH, else
  /usr/local/cuda; only if none exists, every site-packages/nvidia/*/include. It never adds cuDNN's or NCCL's
  pip include folders next to a toolkit, yet its headers include <cudnn.h> and "nccl.h": so they go on
  CPLUS_INCLUDE_PATH, which g++ reads. Libraries are not linked: libtransformer_engine.so (the core wheel) and
  cuDNN are loaded by `import transformer_engine` at run time.
* torch: imported by setup.py itself (so the build needs --no-build-isolation to see the installed CUDA torch);
  setup.py parses torch.version.cuda and pins transformer_engine_cu<major> as a dependency (--no-deps).
* Network: its bdist_wheel first tries to download a prebuilt wheel from GitHub; NVTE_PYTORCH_FORCE_BUILD=TRUE
  skips that. pyproject.toml asks for setuptools, pip and torch in an isolated build env: --no-build-isolation.
* Version: 2.11.0 plus "+<git commit>" if `git rev-parse` succeeds where it builds (inside this repository it
  would), and TE refuses at import a torch extension whose version differs from the core's:
  NVTE_NO_LOCAL_VERSION=1.

Standard library only, except `import torch` for its CUDA version.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional

#: Headers the extension's sources and TE's common headers include (grep of csrc/ and common_headers/).
REQUIRED_HEADERS = ("cuda.h", "cuda_runtime.h", "cudaTypedefs.h", "cuda_bf16.h", "cuda_fp8.h", "cublasLt.h",
                    "cublas_v2.h", "nvrtc.h", "cudnn.h", "nccl.h")


class Refused(Exception):
    """What is missing; the message is the one line the user sees."""


def find_nvcc(cuda_home: Optional[str], torch_cuda_home: Optional[str]) -> Path:
    """CUDA_HOME/bin/nvcc, else nvcc on PATH, else torch's idea of CUDA_HOME, else /usr/local/cuda."""
    candidates = [Path(cuda_home) / "bin" / "nvcc"] if cuda_home else []
    on_path = shutil.which("nvcc")
    candidates += [Path(on_path)] if on_path else []
    candidates += [Path(torch_cuda_home) / "bin" / "nvcc"] if torch_cuda_home else []
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for nvcc in candidates:
        if nvcc.is_file():
            return nvcc.resolve()
    raise Refused("no nvcc found (CUDA_HOME/bin, PATH, /usr/local/cuda); set CUDA_HOME to the CUDA toolkit")


def nvcc_release(nvcc: Path) -> str:
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"release\s*([\d.]+)", out)
    if not match:
        raise Refused(f"{nvcc} --version printed no release number; check the CUDA toolkit")
    return match.group(1)


def include_candidates(cuda_home: Path, site_dirs: Iterable[Path]) -> List[Path]:
    """The toolkit's include folders first, then the pip packages' (nvidia/<pkg>/include, nvidia/cu13/include)."""
    dirs = [cuda_home / "include", cuda_home / "targets" / "x86_64-linux" / "include"]
    for site in site_dirs:
        dirs += sorted(Path(p) for p in glob.glob(str(site / "nvidia" / "*" / "include")))
    return [d for d in dirs if d.is_dir()]


def locate_headers(dirs: List[Path], headers: Iterable[str] = REQUIRED_HEADERS) -> Dict[str, Path]:
    """{header: the first folder that has it}; refuses naming every header that none has."""
    found, missing = {}, []
    for header in headers:
        where = next((d for d in dirs if (d / header).is_file()), None)
        if where is None:
            missing.append(header)
        else:
            found[header] = where
    if missing:
        raise Refused(f"headers not found: {', '.join(missing)} (looked in {', '.join(map(str, dirs)) or 'nothing'}); "
                      "install the matching nvidia-*-cu13 pip package or the CUDA toolkit")
    return found


def build_env(torch_cuda: Optional[str], nvcc: Path, release: str, site_dirs: List[Path],
              jobs: int) -> Dict[str, str]:
    """The environment for `pip wheel --no-index --no-build-isolation --no-deps` of the sdist (build_te.sh);
    refuses what cannot build."""
    if torch_cuda is None:
        raise Refused("this torch is a CPU build; the TE PyTorch extension compiles against a CUDA torch (GPU machine)")
    if torch_cuda.split(".")[0] != release.split(".")[0]:
        raise Refused(f"nvcc is CUDA {release} but torch was built with CUDA {torch_cuda}; use a toolkit of the same major version")
    cuda_home = nvcc.parent.parent
    found = locate_headers(include_candidates(cuda_home, site_dirs))
    extra = []
    for where in found.values():  # folders beyond CUDA_HOME/include, which TE's build adds by itself
        if where != cuda_home / "include" and where not in extra:
            extra.append(where)
    return {
        "CUDA_HOME": str(cuda_home),
        "CPLUS_INCLUDE_PATH": ":".join(map(str, extra)),
        "NVTE_FRAMEWORK": "pytorch",
        "NVTE_PYTORCH_FORCE_BUILD": "TRUE",  # no attempt to download a prebuilt wheel
        "NVTE_NO_LOCAL_VERSION": "1",  # version 2.11.0 exactly, as the core wheel's
        "NVTE_RELEASE_BUILD": "0",
        "MAX_JOBS": str(jobs),
        "NVTE_BUILD_MAX_JOBS": str(jobs),
    }


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report", action="store_true", help="print what was found, one line each, no exports")
    a = p.parse_args(argv)
    try:
        try:
            import torch
            from torch.utils import cpp_extension
        except ImportError as exc:
            raise Refused(f"torch does not import ({exc}); the build compiles against the installed torch") from exc
        nvcc = find_nvcc(os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME)
        release = nvcc_release(nvcc)
        sites = [Path(s) for s in sys.path if s.endswith("site-packages") and Path(s).is_dir()]
        env = build_env(torch.version.cuda, nvcc, release, sites, os.cpu_count() or 1)
    except Refused as err:
        print(f"refused: {err}", file=sys.stderr)
        return 1
    if a.report:
        print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); nvcc {nvcc} (release {release})")
        for key, value in env.items():
            print(f"{key}={value}")
    else:
        for key, value in env.items():
            print(f"export {key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
