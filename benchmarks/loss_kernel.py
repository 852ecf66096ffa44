"""Memory and time of the DRO loss (+ TempNet input) with and without materialised logits.

Prints one JSON line per (shape, kind, method). Kinds:

* ``loss``:    forward + backward of the DRO loss (grads for hidden E, classifier C and tau).
* ``tempnet``: TempNet's first layer on the logits, W1 (z / ||z||) with grad for W1.
               reference: z = E C^T materialised; fused: ``tempnet_first_layer_logits_free`` (W1 C and C^T C).
* ``step``:    both together, LLaMA variant (logits shifted by their max): z -> TempNet -> tau -> DRO loss,
               grads for E, C, W1. Fused: ``vocab_parallel_logit_max`` + the Gram-matrix TempNet input +
               ``linear_dro_cross_entropy``: no N x V tensor anywhere.

Methods: ``reference`` (plain torch, logits materialised), ``torch`` (chunked fused path), ``triton``
(fused kernel, CUDA only), ``torch-lowmem`` / ``triton-lowmem`` (the same with the backward held to
``--backward-memory-mib`` of working memory: blocks of tokens, ``linear_dro_cross_entropy(backward_memory=)``),
``cce`` (apple's ``cut-cross-entropy`` package, tau = 1 plain CE, CUDA only, ``loss`` kind only, if installed). ``filter_eps`` rows report the gradient error that CCE-style filtering
introduces, relative to the same method unfiltered (max |difference| / max |unfiltered|).

Memory, honestly:

* CPU: each row runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536`` (every allocation above
  64 KiB is its own mmap, given back to the OS on free, so resident memory follows live tensors). After a
  warm-up on a tiny shape (library initialisation), the inputs are built, the kernel's peak-RSS counter is
  reset (``echo 5 > /proc/self/clear_refs``), and ``peak_mb = VmHWM - VmRSS_before``: everything the
  forward + backward allocated at its peak, including the gradients it returns.
* CUDA: in process, ``torch.cuda.max_memory_allocated() - memory_allocated()`` before the call.
* ``grads_mb`` is the size of what the call must return (loss, dE, dC, dtau / dW1) -- the same for every
  method -- and ``work_mb = peak_mb - grads_mb`` is the loss's own working memory. The ratios against the
  reference row of the same shape and kind are ``peak_ratio`` and ``work_ratio``.

CPU (default grid, a few minutes on 2 cores)::

    python benchmarks/loss_kernel.py

GPU (H100)::

    pip install cut-cross-entropy   # optional, for the cce rows
    python benchmarks/loss_kernel.py --device cuda --dtype bfloat16 --grid gpu --repeats 5

Time is the wall-clock of one forward + backward (CPU: the measured run; CUDA: median of --repeats after a
warm-up, synchronised).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time

GRIDS = {
    # (tokens, vocab, hidden)
    "cpu": [(2048, 8192, 256), (8192, 32000, 512)],
    "tiny": [(256, 1000, 64)],
    "gpu": [(8192, 32000, 2048), (8192, 128256, 4096), (16384, 256000, 2304), (32768, 128256, 4096)],
}
KINDS = ("loss", "tempnet", "step")
TEMPNET_D = 256
RHO = 0.5
LOGIT_STD = 3.0  # logits of order a trained LM's (peaked softmax), so filtering has something to skip


# ----------------------------------------------------------------------------------------------------
# the computations
# ----------------------------------------------------------------------------------------------------
def make_inputs(N, V, D, dtype, device, seed=0, tau_range=(0.5, 2.0)):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    E = torch.randn(N, D, generator=g).to(device=device, dtype=dtype)
    C = (torch.randn(V, D, generator=g) * (LOGIT_STD / math.sqrt(D))).to(device=device, dtype=dtype)
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    targets[::50] = -100
    lo, hi = tau_range
    tau = (lo + (hi - lo) * torch.rand(N, generator=g)).to(device)
    W1 = (torch.randn(TEMPNET_D, V, generator=g) * 0.02).to(device)
    return E, C, targets, tau, W1


def reference_dro_loss(E, C, targets, tau, rho, V):
    import torch

    z = (E @ C.t()).float()
    s = z / tau.unsqueeze(1)
    logp = torch.log_softmax(s, -1)
    valid = targets != -100
    nll = -logp.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    loss = tau * nll + tau * (rho - math.log(V))
    return torch.where(valid, loss, torch.zeros_like(loss)), z


def tau_head(h1):
    """A stand-in for the rest of TempNet: enough to make tau depend on W1 (not the benchmark's subject)."""
    import torch

    return 0.5 + 4.5 * torch.sigmoid(h1.mean(1))


def run_case(kind, method, E, C, targets, tau, W1, V, filter_eps=None, backward_memory=None):
    """One forward + backward; returns the tensors the caller keeps (loss and grads). backward_memory (bytes)
    applies to the -lowmem methods."""
    import torch

    from tempnet_kernels.dro_cce import (linear_dro_cross_entropy, tempnet_first_layer_logits_free,
                                         vocab_parallel_logit_max)

    E = E.detach().requires_grad_(kind != "tempnet")
    C = C.detach().requires_grad_(kind != "tempnet")
    W1 = W1.detach().requires_grad_(kind != "loss")
    tau = tau.detach().requires_grad_(kind == "loss")
    fused_impl = {"torch": "torch", "triton": "triton", "torch-lowmem": "torch", "triton-lowmem": "triton"}.get(method)
    budget = backward_memory if method.endswith("-lowmem") else None
    if kind == "loss":
        if method == "reference":
            loss, _ = reference_dro_loss(E, C, targets, tau, RHO, V)
        elif method == "cce":
            from cut_cross_entropy import linear_cross_entropy

            loss = linear_cross_entropy(E, C, targets, reduction="none", ignore_index=-100,
                                        filter_eps=filter_eps)
        else:
            loss = linear_dro_cross_entropy(E, C, targets, tau, RHO, V, impl=fused_impl, filter_eps=filter_eps,
                                            backward_memory=budget)
        loss.float().mean().backward()
        return [loss.detach(), E.grad, C.grad] + ([tau.grad] if tau.grad is not None else [])
    if kind == "tempnet":
        if method == "reference":
            with torch.no_grad():
                z = (E @ C.t()).float()
                x = z / z.norm(dim=1, keepdim=True)
                del z
            h1 = x @ W1.t()
        else:
            w1z, sq = tempnet_first_layer_logits_free(E, C, W1, V)
            h1 = w1z / sq.sqrt().unsqueeze(1)
        h1.mean().backward()
        return [h1.detach(), W1.grad]
    # step: LLaMA-variant TempNet input -> tau -> DRO loss
    if method == "reference":
        z = (E @ C.t()).float()
        with torch.no_grad():
            zt = z - z.amax(1, keepdim=True)
            x = zt / zt.norm(dim=1, keepdim=True)
            del zt
        tau_ = tau_head(x @ W1.t())
        s = z / tau_.unsqueeze(1)
        logp = torch.log_softmax(s, -1)
        nll = -logp.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
        loss = tau_ * nll + tau_ * (RHO - math.log(V))
        loss = torch.where(targets != -100, loss, torch.zeros_like(loss))
        del z, s, logp, x
    else:
        m = vocab_parallel_logit_max(E, C, V)
        w1z, sq = tempnet_first_layer_logits_free(E, C, W1, V, shift=m)
        tau_ = tau_head(w1z / sq.sqrt().unsqueeze(1))
        loss = linear_dro_cross_entropy(E, C, targets, tau_, RHO, V, impl=fused_impl, filter_eps=filter_eps,
                                        backward_memory=budget)
    loss.mean().backward()
    return [loss.detach(), E.grad, C.grad, W1.grad]


# ----------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------
def _proc_status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def measure_one(kind, method, N, V, D, dtype_name, device, repeats, filter_eps, tau_range=(0.5, 2.0),
                backward_memory=None):
    """Runs in the process that measures; returns the JSON row."""
    import torch

    dtype = getattr(torch, dtype_name)
    row = dict(kind=kind, method=method, tokens=N, vocab=V, hidden=D, dtype=dtype_name, device=device,
               filter_eps=filter_eps, tau_range=list(tau_range))
    if method.endswith("-lowmem"):
        row["backward_memory_mib"] = backward_memory / 2**20
    if method.startswith("triton") and device != "cuda":
        return dict(row, skipped="triton kernel: CUDA only (tests run it under TRITON_INTERPRET=1)")
    if method == "cce":
        if device != "cuda" or kind != "loss":
            return dict(row, skipped="cut-cross-entropy: CUDA only, plain CE (loss kind)")
        try:
            import cut_cross_entropy  # noqa: F401
        except ImportError:
            return dict(row, skipped="cut-cross-entropy not installed (pip install cut-cross-entropy)")
    # warm-up on a tiny shape: library initialisation, Triton compilation of the same kernels
    wE, wC, wt, wtau, wW1 = make_inputs(64, 300, D, dtype, device)
    run_case(kind, method, wE, wC, wt, wtau, wW1, 300, filter_eps, backward_memory)
    del wE, wC, wt, wtau, wW1
    E, C, targets, tau, W1 = make_inputs(N, V, D, dtype, device, tau_range=tau_range)
    from tempnet_kernels.dro_cce import FILTER_STATS

    FILTER_STATS.update(rows_total=0, rows_skipped=0)
    gc.collect()
    if device == "cuda":
        for _ in range(1):  # warm-up at the real shape (autotuning, allocator)
            out = run_case(kind, method, E, C, targets, tau, W1, V, filter_eps, backward_memory)
            del out
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = run_case(kind, method, E, C, targets, tau, W1, V, filter_eps, backward_memory)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        times = []
        for _ in range(repeats):
            del out
            t0 = time.perf_counter()
            out = run_case(kind, method, E, C, targets, tau, W1, V, filter_eps, backward_memory)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        seconds = sorted(times)[len(times) // 2]
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base_kb = _proc_status_kb("VmRSS")
        t0 = time.perf_counter()
        out = run_case(kind, method, E, C, targets, tau, W1, V, filter_eps, backward_memory)
        seconds = time.perf_counter() - t0
        peak = (_proc_status_kb("VmHWM") - base_kb) * 1024
    grads = sum(t.numel() * t.element_size() for t in out if t is not None)
    row.update(seconds=round(seconds, 3), peak_mb=round(peak / 2**20, 1), grads_mb=round(grads / 2**20, 1),
               work_mb=round((peak - grads) / 2**20, 1))
    if filter_eps is not None and method.startswith("torch"):
        from tempnet_kernels.dro_cce import FILTER_STATS

        row["skipped_fraction"] = round(FILTER_STATS["rows_skipped"] / max(FILTER_STATS["rows_total"], 1), 4)
    if filter_eps is not None:  # error that filtering introduces, against the same method unfiltered
        ref = run_case(kind, method, E, C, targets, tau, W1, V, None, backward_memory)
        for name, a, b in zip(("loss", "dE", "dC", "dlast"), out, ref):
            if a is not None and b is not None:
                err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
                row[f"{name}_rel_err"] = float(f"{err:.3g}")
    return row


def run_in_subprocess(args_list):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(args_list)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(zip(("kind", "method", "tokens", "vocab", "hidden"), args_list[:5]),
                    error=(proc.stderr or proc.stdout).strip().splitlines()[-1:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure_guarded(case):
    """In-process (CUDA) measurement; an out-of-memory or other failure becomes an error row."""
    import torch

    try:
        return measure_one(*case)
    except Exception as exc:  # noqa: BLE001 - report and go on with the next row
        gc.collect()
        torch.cuda.empty_cache()
        return dict(zip(("kind", "method", "tokens", "vocab", "hidden"), case[:5]),
                    error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--grid", default=None, choices=sorted(GRIDS), help="cpu (default on CPU), gpu, tiny")
    p.add_argument("--shapes", default=None, help="comma list of NxVxD, overrides --grid, e.g. 4096x32000x512")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--methods", default=None, help="default: reference,torch (CPU); +triton,cce (CUDA)")
    p.add_argument("--filter-eps", default=None,
                   help="comma list of eps for extra filtered rows of the fused methods (loss kind); "
                        "default 2^-12 (CCE's bf16 'auto') on the first shape (CPU) or every shape (CUDA)")
    p.add_argument("--tau-range", default="0.5,2.0",
                   help="LO,HI: temperatures drawn uniformly from [LO, HI] (loss kind), e.g. 0.01,0.1")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backward-memory-mib", type=float, default=32.0,
                   help="working-memory budget of the -lowmem methods' backward (MiB)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one is not None:
        print(json.dumps(measure_one(*json.loads(a.one))))
        return
    dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    shapes = ([tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")] if a.shapes
              else GRIDS[a.grid or ("gpu" if a.device == "cuda" else "cpu")])
    methods = (a.methods.split(",") if a.methods
               else (["reference", "torch", "triton", "triton-lowmem", "cce"] if a.device == "cuda"
                     else ["reference", "torch"]))
    if a.backward_memory_mib <= 0:
        p.error(f"--backward-memory-mib must be positive; got {a.backward_memory_mib}")
    budget = int(a.backward_memory_mib * 2**20)
    kinds = a.kinds.split(",")
    try:
        tau_range = [float(x) for x in a.tau_range.split(",")]
    except ValueError:
        tau_range = []
    if len(tau_range) != 2 or not 0 < tau_range[0] <= tau_range[1]:
        p.error(f"--tau-range takes LO,HI with 0 < LO <= HI, e.g. 0.01,0.1; got {a.tau_range!r}")
    if a.filter_eps is not None:
        eps_list = [float(x) for x in a.filter_eps.split(",") if x]
        eps_shapes = shapes
    else:
        eps_list = [2.0 ** -12]  # CCE's "auto" for bf16 (finfo.eps / 32)
        eps_shapes = shapes if a.device == "cuda" else shapes[:1]
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device")
    for (N, V, D) in shapes:
        ref_rows = {}
        for kind in kinds:
            for method in methods:
                if method == "cce" and kind != "loss":
                    continue
                case = [kind, method, N, V, D, dtype, a.device, a.repeats, None, tau_range, budget]
                row = run_in_subprocess(case) if a.device == "cpu" else _measure_guarded(case)
                if method == "reference" and "peak_mb" in row:
                    ref_rows[kind] = row
                ref = ref_rows.get(kind)
                if ref is not None and method != "reference" and "peak_mb" in row:
                    row["peak_ratio"] = float(f"{row['peak_mb'] / max(ref['peak_mb'], 1e-9):.4g}")
                    row["work_ratio"] = float(f"{row['work_mb'] / max(ref['work_mb'], 1e-9):.4g}")
                print(json.dumps(row), flush=True)
        if (N, V, D) in eps_shapes and "loss" in kinds:
            for method in methods:
                if method in ("reference", "cce" if a.device != "cuda" else ""):
                    continue
                for eps in eps_list:
                    case = ["loss", method, N, V, D, dtype, a.device, a.repeats, eps, tau_range, budget]
                    row = run_in_subprocess(case) if a.device == "cpu" else _measure_guarded(case)
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
