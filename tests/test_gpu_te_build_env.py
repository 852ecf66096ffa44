"""examples/gpu/te_build_env.py on a fake CUDA tree: where the TE extension's build finds nvcc and every header,
and one-line refusals for a CPU torch, a CUDA major-version mismatch and a missing header."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "gpu" / "te_build_env.py"
spec = importlib.util.spec_from_file_location("te_build_env", SCRIPT)
tbe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tbe)


@pytest.fixture
def fake_cuda(tmp_path):
    """A toolkit with nvcc and the CUDA headers, and a site-packages with cuDNN's and NCCL's pip headers."""
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.48'\n")
    nvcc.chmod(0o755)
    (home / "include").mkdir()
    site = tmp_path / "site-packages"
    for header in tbe.REQUIRED_HEADERS:
        pkg = {"cudnn.h": "cudnn", "nccl.h": "nccl"}.get(header)
        folder = site / "nvidia" / pkg / "include" if pkg else home / "include"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / header).write_text("")
    return home, nvcc, site


def test_environment_for_the_build(fake_cuda):
    home, nvcc, site = fake_cuda
    assert tbe.find_nvcc(str(home), None) == nvcc.resolve()
    release = tbe.nvcc_release(nvcc)
    env = tbe.build_env("13.0", nvcc, release, [site], 16)
    assert release == "13.0" and env["CUDA_HOME"] == str(home)
    assert env["CPLUS_INCLUDE_PATH"].split(":") == [str(site / "nvidia" / "cudnn" / "include"),
                                                    str(site / "nvidia" / "nccl" / "include")]
    assert env["NVTE_PYTORCH_FORCE_BUILD"] == "TRUE" and env["NVTE_NO_LOCAL_VERSION"] == "1"
    assert env["MAX_JOBS"] == env["NVTE_BUILD_MAX_JOBS"] == "16" and env["NVTE_FRAMEWORK"] == "pytorch"


def test_cpu_torch_refused(fake_cuda):
    _, nvcc, site = fake_cuda
    with pytest.raises(tbe.Refused, match="this torch is a CPU build"):
        tbe.build_env(None, nvcc, "13.0", [site], 16)


def test_cuda_major_mismatch_refused(fake_cuda):
    _, nvcc, site = fake_cuda
    with pytest.raises(tbe.Refused, match="nvcc is CUDA 13.0 but torch was built with CUDA 12.8"):
        tbe.build_env("12.8", nvcc, "13.0", [site], 16)


def test_missing_headers_named(fake_cuda):
    _, nvcc, site = fake_cuda
    (site / "nvidia" / "nccl" / "include" / "nccl.h").unlink()
    (nvcc.parent.parent / "include" / "nvrtc.h").unlink()
    with pytest.raises(tbe.Refused, match=r"headers not found: nvrtc.h, nccl.h \(looked in "):
        tbe.build_env("13.0", nvcc, "13.0", [site], 16)


def test_cli_on_this_machine_refuses_in_one_line_or_reports():
    env = dict(os.environ, CUDA_HOME="/nonexistent-cuda", PATH="/usr/bin:/bin")
    out = subprocess.run([sys.executable, str(SCRIPT), "--report"], capture_output=True, text=True, env=env)
    if out.returncode == 0:  # a machine with a CUDA toolkit at /usr/local/cuda
        assert "CUDA_HOME=" in out.stdout
    else:
        assert out.returncode == 1 and out.stdout == "" and out.stderr.count("\n") == 1
        assert out.stderr.startswith("refused: ")
