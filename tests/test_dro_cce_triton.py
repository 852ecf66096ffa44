"""The Triton forward kernel of tempnet_kernels.dro_cce, run on CPU by Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton is first imported, so the checks run in a child process
(this file run as a script); the variable never leaks into the pytest process. Shapes are tiny because
the interpreter is slow.
"""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _child_checks():
    """Runs in the child, with TRITON_INTERPRET=1; returns {check name: relative error}."""
    import torch

    from test_dro_cce import make_inputs, rel_err, run_fused, run_reference

    assert "triton" not in sys.modules or os.environ["TRITON_INTERPRET"] == "1"
    out = {}
    rho = 0.8
    # fp32: padded vocabulary (37 of 40 rows), ignored tokens, tiles that do not divide N, V or D
    for name, (N, V, V_pad, D) in {"even": (16, 37, 40, 16), "ragged": (19, 37, 45, 20)}.items():
        hidden, weight, targets, tau, up = make_inputs(N=N, V=V, V_pad=V_pad, D=D)
        ref = run_reference(hidden, weight, targets, tau, rho, V, up)
        got = run_fused(hidden, weight, targets, tau, rho, V, up, impl="triton")
        for k, x, y in zip(("loss", "dE", "dC", "dtau"), got, ref):
            out[f"fp32_{name}_{k}"] = rel_err(x, y)
        out[f"fp32_{name}_padded_dC_zero"] = float(got[2][V:].abs().max())
    hidden, weight, targets, tau, up = make_inputs(N=16, V=37, V_pad=40, D=16)
    # one tensor-parallel rank's view: rows 20..39 of a 37-word vocabulary (17 valid + 3 padding), targets
    # partly elsewhere; the per-shard statistics of both implementations agree
    import tempnet_kernels._dro_cce_triton as tk
    from tempnet_kernels import dro_cce

    E, C = hidden.float(), weight[20:].float()
    inv_tau = 1.0 / tau.float()
    tl_ = targets - 20
    tl_ = torch.where((targets != -100) & (tl_ >= 0) & (tl_ < 17), tl_, torch.full_like(tl_, -1))
    st_tr = tk.forward_stats(E, C, inv_tau, tl_, 17)
    st_to = dro_cce._torch_forward_stats(E, C, inv_tau, tl_, 17, 7)
    for k, x, y in zip(("m", "l", "a", "zy"), st_tr, st_to):
        out[f"shard_{k}"] = rel_err(x, y)
    out["empty_shard_l"] = float(tk.forward_stats(E, C, inv_tau, tl_, 0)[1].abs().max())
    # 16-bit inputs against the torch path (same inputs, fp32 accumulation in both)
    for dt in (torch.float16, torch.bfloat16):
        a = run_fused(hidden, weight, targets, tau, rho, 37, up, dtype=dt, impl="triton")
        b = run_fused(hidden, weight, targets, tau, rho, 37, up, dtype=dt, impl="torch")
        for k, x, y in zip(("loss", "dE", "dC", "dtau"), a, b):
            out[f"{str(dt)[6:]}_{k}"] = rel_err(x, y)
    # the Triton forward with the backward in token blocks (backward_memory), against float64
    h2, w2, t2, tau2, up2 = make_inputs(N=150, V=37, V_pad=40, D=16, n_ignored=9)
    ref2 = run_reference(h2, w2, t2, tau2, rho, 37, up2)
    got2 = run_fused(h2, w2, t2, tau2, rho, 37, up2, impl="triton", backward_memory=1)
    for k, x, y in zip(("loss", "dE", "dC", "dtau"), got2, ref2):
        out[f"token_blocks_{k}"] = rel_err(x, y)
    # impl="auto" on CPU tensors takes the torch path even with the interpreter on
    auto = run_fused(hidden, weight, targets, tau, rho, 37, up, impl="auto")
    out["auto_is_torch"] = max(float((x - y).abs().max()) for x, y in zip(
        auto, run_fused(hidden, weight, targets, tau, rho, 37, up, impl="torch")))
    return out


@pytest.fixture(scope="module")
def interp_results():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_triton_interpreter_fp32_matches_reference(interp_results):
    pytest.importorskip("triton")
    for case in ("even", "ragged"):
        for k in ("loss", "dE", "dC", "dtau"):
            assert interp_results[f"fp32_{case}_{k}"] < 1e-5, (case, k, interp_results)
        assert interp_results[f"fp32_{case}_padded_dC_zero"] == 0.0
    for k in ("m", "l", "a", "zy"):
        assert interp_results[f"shard_{k}"] < 1e-5, (k, interp_results)
    assert interp_results["empty_shard_l"] == 0.0


def test_triton_interpreter_16bit_matches_torch_path(interp_results):
    pytest.importorskip("triton")
    for dt, tol in (("float16", 5e-3), ("bfloat16", 3e-2)):
        assert interp_results[f"{dt}_loss"] < 1e-5 and interp_results[f"{dt}_dtau"] < 1e-5, interp_results
        assert interp_results[f"{dt}_dE"] < tol and interp_results[f"{dt}_dC"] < tol, interp_results


def test_triton_forward_with_token_block_backward_matches_reference(interp_results):
    pytest.importorskip("triton")
    for k in ("loss", "dE", "dC", "dtau"):
        assert interp_results[f"token_blocks_{k}"] < 1e-5, (k, interp_results)


def test_auto_takes_the_torch_path_on_cpu_tensors(interp_results):
    pytest.importorskip("triton")
    assert interp_results["auto_is_torch"] == 0.0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1")
    sys.path.insert(0, HERE)
    print(json.dumps(_child_checks()))
