"""Fused linear + DRO cross-entropy (tempnet_kernels.dro_cce): values and gradients against a direct
reference that materialises the logits, tensor parallelism on real gloo groups, bad inputs.

The Triton kernel under TRITON_INTERPRET=1 is tested in test_dro_cce_triton.py (subprocess).
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import free_port

from tempnet_kernels.dro_cce import (
    linear_dro_cross_entropy,
    tempnet_first_layer_logits_free,
    vocab_parallel_logit_max,
)

IGNORE = -100


# ----------------------------------------------------------------------------------------------------
# reference (materialises logits; float64 where it is used as ground truth)
# ----------------------------------------------------------------------------------------------------
def reference_dro_loss(hidden, weight, targets, tau, rho, vocab_size, ignore_index=IGNORE):
    """L = tau * (logsumexp(z/tau) - z_y/tau) + tau * (rho - log V), padded rows (>= V) masked out."""
    z = hidden @ weight.t()
    s = z / tau.unsqueeze(-1)
    pad = torch.arange(weight.shape[0], device=z.device) >= vocab_size
    s = s.masked_fill(pad, float("-inf"))
    logp = torch.log_softmax(s, -1)
    valid = targets != ignore_index
    nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss = tau * nll + tau * (rho - math.log(vocab_size))
    return torch.where(valid, loss, torch.zeros_like(loss))


def make_inputs(N=24, V=37, V_pad=40, D=16, seed=0, n_ignored=3, tau_range=(0.3, 3.0)):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V_pad, D, generator=g, dtype=torch.float64) * 0.7
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.randperm(N, generator=g)[:n_ignored]] = IGNORE
    lo, hi = tau_range
    tau = lo + (hi - lo) * torch.rand(N, generator=g, dtype=torch.float64)
    upstream = torch.randn(N, generator=g, dtype=torch.float64)
    return hidden, weight, targets, tau, upstream


def run_reference(hidden, weight, targets, tau, rho, V, upstream):
    h, w, t = (x.detach().double().clone().requires_grad_() for x in (hidden, weight, tau))
    loss = reference_dro_loss(h, w, targets, t, rho, V)
    (loss * upstream.double()).sum().backward()
    return loss.detach(), h.grad, w.grad, t.grad


def run_fused(hidden, weight, targets, tau, rho, V, upstream, dtype=torch.float32, **kw):
    h, w = (x.detach().to(dtype).clone().requires_grad_() for x in (hidden, weight))
    t = tau.detach().float().clone().requires_grad_()
    loss = linear_dro_cross_entropy(h, w, targets, t, rho, V, **kw)
    (loss * upstream.to(loss.dtype)).sum().backward()
    return loss.detach(), h.grad, w.grad, t.grad


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_close_all(got, ref, tol, names=("loss", "dE", "dC", "dtau")):
    for name, x, y in zip(names, got, ref):
        assert x.shape == y.shape, (name, x.shape, y.shape)
        e = rel_err(x, y)
        assert e < tol, f"{name}: relative error {e:.3g} >= {tol}"


# ----------------------------------------------------------------------------------------------------
# torch path, single rank
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [7, 16, 512])
@pytest.mark.parametrize("V,V_pad", [(37, 40), (40, 40)])
def test_torch_path_matches_reference_fp32(chunk_size, V, V_pad):
    hidden, weight, targets, tau, up = make_inputs(V=V, V_pad=V_pad)
    rho = 0.8
    ref = run_reference(hidden, weight, targets, tau, rho, V, up)
    got = run_fused(hidden, weight, targets, tau, rho, V, up, impl="torch", chunk_size=chunk_size)
    assert got[0].dtype == torch.float32
    assert_close_all(got, ref, 1e-5)
    # padded rows of C get exactly zero gradient
    assert torch.all(got[2][V:] == 0)


def test_extreme_temperatures_and_logits():
    hidden, weight, targets, tau, up = make_inputs(N=32, tau_range=(0.02, 8.0), seed=3)
    hidden = hidden * 6.0  # logits of order +-100: exp would overflow without the running max
    ref = run_reference(hidden, weight, targets, tau, 2.0, 37, up)
    got = run_fused(hidden, weight, targets, tau, 2.0, 37, up, impl="torch", chunk_size=8)
    assert all(torch.isfinite(x).all() for x in got)
    assert_close_all(got, ref, 1e-5)


def test_leading_dims_are_kept():
    hidden, weight, targets, tau, up = make_inputs(N=24)
    shp = (4, 6)
    ref = run_reference(hidden, weight, targets, tau, 0.5, 37, up)
    h, w = hidden.float().view(*shp, -1).requires_grad_(), weight.float().requires_grad_()
    t = tau.float().view(shp).requires_grad_()
    loss = linear_dro_cross_entropy(h, w, targets.view(shp), t, 0.5, 37, impl="torch")
    assert loss.shape == shp
    (loss * up.float().view(shp)).sum().backward()
    assert_close_all((loss.reshape(-1), h.grad.reshape(-1, 16), w.grad, t.grad.reshape(-1)), ref, 1e-5)


def test_tau_one_rho_logV_is_cross_entropy():
    hidden, weight, targets, _, up = make_inputs(V=37, V_pad=40)
    V = 37
    tau = torch.ones(hidden.shape[0], dtype=torch.float64)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ce = F.cross_entropy(h @ w[:V].t(), targets, reduction="none", ignore_index=IGNORE)
    (ce * up).sum().backward()
    got = run_fused(hidden, weight, targets, tau, math.log(V), V, up, impl="torch", chunk_size=16)
    assert rel_err(got[0], ce.detach()) < 1e-5
    assert rel_err(got[1], h.grad) < 1e-5
    assert rel_err(got[2][:V], w.grad[:V]) < 1e-5
    assert torch.all(got[2][V:] == 0)


def test_dtau_is_rho_minus_kl_to_uniform():
    hidden, weight, targets, tau, _ = make_inputs(V=37, V_pad=40, n_ignored=0)
    V, rho = 37, 1.3
    ones = torch.ones_like(tau)
    _, _, _, dtau = run_fused(hidden, weight, targets, tau, rho, V, ones, impl="torch", chunk_size=9)
    p = torch.softmax((hidden @ weight[:V].t()) / tau.unsqueeze(1), -1)
    kl = (p * torch.log(p)).sum(1) + math.log(V)  # KL(p || uniform(V))
    assert rel_err(dtau, rho - kl) < 1e-5
    # and numerically: central difference of the reference loss in tau
    h = 1e-6
    lp = reference_dro_loss(hidden, weight, targets, tau + h, rho, V)
    lm = reference_dro_loss(hidden, weight, targets, tau - h, rho, V)
    assert rel_err(dtau, (lp - lm) / (2 * h)) < 1e-5


def test_ignored_tokens_give_zero_loss_and_gradients():
    hidden, weight, targets, tau, up = make_inputs(n_ignored=5)
    ign = targets == IGNORE
    tau = tau.clone()
    tau[ign] = 0.0  # ignored tokens may carry any tau, even invalid ones
    loss, dE, dC, dtau = run_fused(hidden, weight, targets, tau, 0.3, 37, up, impl="torch")
    assert torch.all(loss[ign] == 0) and torch.all(dE[ign] == 0) and torch.all(dtau[ign] == 0)
    # all tokens ignored: zero loss and zero gradients everywhere
    allign = torch.full_like(targets, IGNORE)
    loss, dE, dC, dtau = run_fused(hidden, weight, allign, tau, 0.3, 37, up, impl="torch")
    assert not loss.any() and not dE.any() and not dC.any() and not dtau.any()
    # custom ignore_index
    t2 = targets.clone()
    t2[ign] = 7777
    ref = run_fused(hidden, weight, targets, tau, 0.3, 37, up, impl="torch")
    got = run_fused(hidden, weight, t2, tau, 0.3, 37, up, impl="torch", ignore_index=7777)
    for x, y in zip(got, ref):
        assert torch.equal(x, y)


def test_bf16_inputs_fp32_accumulation():
    hidden, weight, targets, tau, up = make_inputs(N=32, V=37, V_pad=48, D=32)
    ref = run_reference(hidden.bfloat16().double(), weight.bfloat16().double(), targets, tau, 0.5, 37, up)
    got = run_fused(hidden, weight, targets, tau, 0.5, 37, up, dtype=torch.bfloat16, impl="torch", chunk_size=16)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    assert got[3].dtype == torch.float32
    assert_close_all(got[:1] + got[3:], ref[:1] + ref[3:], 1e-5, names=("loss", "dtau"))  # fp32 math
    assert_close_all(got[1:3], ref[1:3], 1e-2, names=("dE", "dC"))  # rounded to bf16 on output


def test_filter_eps():
    hidden, weight, targets, tau, up = make_inputs(N=32, V=300, V_pad=320, D=16, tau_range=(0.2, 0.5))
    hidden = hidden * 3
    base = run_fused(hidden, weight, targets, tau, 0.5, 300, up, impl="torch", chunk_size=64)
    same = run_fused(hidden, weight, targets, tau, 0.5, 300, up, impl="torch", chunk_size=64, filter_eps=0.0)
    for x, y in zip(same, base):
        assert torch.equal(x, y)
    filt = run_fused(hidden, weight, targets, tau, 0.5, 300, up, impl="torch", chunk_size=64, filter_eps=1e-6)
    assert torch.equal(filt[0], base[0]) and torch.equal(filt[3], base[3])  # loss, dtau exact
    assert rel_err(filt[1], base[1]) < 1e-4 and rel_err(filt[2], base[2]) < 1e-4
    assert not torch.equal(filt[2], base[2])  # something was actually skipped


def test_only_requested_gradients():
    hidden, weight, targets, tau, up = make_inputs()
    h = hidden.float().requires_grad_()
    loss = linear_dro_cross_entropy(h, weight.float(), targets, tau.float(), 0.5, 37, impl="torch")
    loss.sum().backward()
    assert h.grad is not None
    t = tau.float().requires_grad_()
    linear_dro_cross_entropy(hidden.float(), weight.float(), targets, t, 0.5, 37, impl="torch").sum().backward()
    assert t.grad is not None


def test_vocab_parallel_logit_max_single_rank():
    hidden, weight, *_ = make_inputs(V=37, V_pad=40)
    weight = weight.clone()
    weight[37:] = 100.0  # padded rows would win the max if they were not masked
    got = vocab_parallel_logit_max(hidden.float(), weight.float(), 37, chunk_size=5)
    ref = (hidden @ weight[:37].t()).amax(1)
    assert got.dtype == torch.float32 and rel_err(got, ref) < 1e-6


def _tempnet_reference(hidden, weight, w1, V, shift=None):
    z = hidden @ weight[:V].t()
    if shift is not None:
        z = z - shift.unsqueeze(1)
    return z @ w1[:, :V].t(), (z * z).sum(1)


@pytest.mark.parametrize("use_shift", [False, True])
def test_tempnet_first_layer_logits_free(use_shift):
    hidden, weight, *_ = make_inputs(V=37, V_pad=40, D=16)
    d = 8
    w1 = torch.randn(d, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    shift = (hidden @ weight[:37].t()).amax(1) if use_shift else None
    w1r = w1.clone().requires_grad_()
    rz, rsq = _tempnet_reference(hidden, weight, w1r, 37, shift)
    up = torch.randn_like(rz)
    (rz * up).sum().backward()
    w1f = w1.float().requires_grad_()
    fz, fsq = tempnet_first_layer_logits_free(
        hidden.float(), weight.float(), w1f, 37, shift=None if shift is None else shift.float(), chunk_size=6)
    (fz * up.float()).sum().backward()
    assert rel_err(fz, rz.detach()) < 1e-5
    assert rel_err(fsq, rsq) < 1e-5
    assert rel_err(w1f.grad, w1r.grad) < 1e-5
    assert torch.all(w1f.grad[:, 37:] == 0)


# ----------------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------------
def _good():
    hidden, weight, targets, tau, _ = make_inputs()
    return dict(hidden=hidden.float(), weight=weight.float(), targets=targets, tau=tau.float(), rho=0.5,
                vocab_size=37)


def _call(kw):
    kw = dict(kw)
    args = [kw.pop(k) for k in ("hidden", "weight", "targets", "tau", "rho", "vocab_size")]
    return linear_dro_cross_entropy(*args, **kw)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda k: k.update(weight=k["weight"].double()), "same dtype"),
        (lambda k: k.update(weight=k["weight"].t().contiguous()), "hidden size mismatch"),
        (lambda k: k.update(weight=k["weight"][0]), "weight must be a 2-D"),
        (lambda k: k.update(hidden=k["hidden"].long()), "hidden must be a floating-point"),
        (lambda k: k.update(targets=k["targets"][:-1]), "targets shape"),
        (lambda k: k.update(targets=k["targets"].float()), "targets must be an integer"),
        (lambda k: k.update(tau=k["tau"][:-1]), "tau shape"),
        (lambda k: k.update(tau=k["tau"].long()), "tau must be a floating-point"),
        (lambda k: k["targets"].__setitem__(0, 37), r"targets must be in \[0, vocab_size=37\)"),
        (lambda k: k["targets"].__setitem__(0, -1), "targets must be in"),
        (lambda k: k["tau"].__setitem__(1, 0.0), "tau must be finite and > 0"),
        (lambda k: k["tau"].__setitem__(1, -2.0), "tau must be finite and > 0"),
        (lambda k: k["tau"].__setitem__(1, float("nan")), "tau must be finite and > 0"),
        (lambda k: k["tau"].__setitem__(1, float("inf")), "tau must be finite and > 0"),
        (lambda k: k.update(impl="cuda"), "impl must be"),
        (lambda k: k.update(vocab_size=50), "must cover the whole vocabulary"),
        (lambda k: k.update(vocab_size=0), "vocab_size must be a positive int"),
        (lambda k: k.update(vocab_start_index=-1), "vocab_start_index"),
        (lambda k: k.update(chunk_size=0), "chunk_size"),
        (lambda k: k.update(filter_eps=-1.0), "filter_eps"),
        (lambda k: k.update(rho=float("nan")), "rho must be a finite"),
        (lambda k: k.update(hidden=k["hidden"].to("meta")), "hidden is on meta but weight is on cpu"),
        (lambda k: k.update(tau=k["tau"].to("meta")), "tau is on meta"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, match):
    kw = _good()
    change(kw)
    with pytest.raises(ValueError, match=match):
        _call(kw)


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter enabled in this process")
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        _call(dict(_good(), impl="triton"))


# ----------------------------------------------------------------------------------------------------
# tensor parallelism: 2 gloo ranks, each with half of the (padded) vocabulary rows
# ----------------------------------------------------------------------------------------------------
TP_CASES = {
    # name: (V, V_pad); "empty_shard": rank 1 holds only padding rows
    "padded": (37, 40),
    "empty_shard": (18, 40),
}


def _tp_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        group = dist.new_group(list(range(world)))
        results = {}
        for name, (V, V_pad) in TP_CASES.items():
            hidden, weight, targets, tau, up = make_inputs(V=V, V_pad=V_pad)
            shard = V_pad // world
            start = rank * shard
            w = weight[start:start + shard].float().clone().requires_grad_()
            h = hidden.float().clone().requires_grad_()
            t = tau.float().clone().requires_grad_()
            kw = dict(vocab_start_index=start, tp_group=group, impl="torch", chunk_size=7)
            loss = linear_dro_cross_entropy(h, w, targets, t, 0.8, V, **kw)
            (loss * up.float()).sum().backward()
            # the documented convention: wrap hidden like ColumnParallelLinear does -> full dE on every rank
            h2 = hidden.float().clone().requires_grad_()
            loss2 = linear_dro_cross_entropy(copy_to_tensor_model_parallel_region(h2, group=group),
                                             w.detach(), targets, tau.float(), 0.8, V, **kw)
            (loss2 * up.float()).sum().backward()
            lmax = vocab_parallel_logit_max(hidden.float(), w.detach(), V, vocab_start_index=start,
                                            tp_group=group, chunk_size=5)
            w1 = torch.randn(8, V_pad, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
            w1s = w1[:, start:start + shard].float().clone().requires_grad_()
            tz, tsq = tempnet_first_layer_logits_free(hidden.float(), w.detach(), w1s, V, start, group,
                                                      shift=lmax, chunk_size=6)
            tz.sum().backward()
            results[name] = dict(loss=loss.detach(), dE_partial=h.grad, dC=w.grad, dtau=t.grad,
                                 dE_wrapped=h2.grad, loss2=loss2.detach(), lmax=lmax, tz=tz.detach(),
                                 tsq=tsq, dw1=w1s.grad)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_tensor_parallel_equals_single_rank(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_tp_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name, (V, V_pad) in TP_CASES.items():
        hidden, weight, targets, tau, up = make_inputs(V=V, V_pad=V_pad)
        ref = run_fused(hidden, weight, targets, tau, 0.8, V, up, impl="torch")
        rr = run_reference(hidden, weight, targets, tau, 0.8, V, up)
        assert_close_all(ref, rr, 1e-5)
        for r in ranks:
            rs = r[name]
            assert rel_err(rs["loss"], rr[0]) < 1e-5, name
            assert rel_err(rs["loss2"], rr[0]) < 1e-5, name
            assert rel_err(rs["dtau"], rr[3]) < 1e-5, name  # full dtau on every rank
            assert rel_err(rs["dE_wrapped"], rr[1]) < 1e-5, name  # all-reduced by copy_to_..._region
        assert torch.equal(ranks[0][name]["dtau"], ranks[1][name]["dtau"])
        assert torch.equal(ranks[0][name]["loss"], ranks[1][name]["loss"])
        dE = sum(r[name]["dE_partial"] for r in ranks)
        assert rel_err(dE, rr[1]) < 1e-5, name
        dC = torch.cat([r[name]["dC"] for r in ranks])
        assert rel_err(dC, rr[2]) < 1e-5, name
        # logit max and the logits-free TempNet input
        z = hidden @ weight[:V].t()
        lmax = z.amax(1)
        w1 = torch.randn(8, V_pad, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        w1r = w1.clone().requires_grad_()
        rz, rsq = _tempnet_reference(hidden, weight, w1r, V, lmax)
        rz.sum().backward()
        for r in ranks:
            assert rel_err(r[name]["lmax"], lmax) < 1e-6
            assert rel_err(r[name]["tz"], rz.detach()) < 1e-5
            assert rel_err(r[name]["tsq"], rsq.detach()) < 1e-5
        dw1 = torch.cat([r[name]["dw1"] for r in ranks], 1)
        assert rel_err(dw1, w1r.grad) < 1e-5


# ----------------------------------------------------------------------------------------------------
# GPU: compiled Triton kernel vs the torch path
# ----------------------------------------------------------------------------------------------------
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


GPU_VOCAB = 5003  # padded to 5120: the last tiles are part padding


def gpu_problem(n: int, dtype):
    """hidden [n, 256], weight [5120, 256] (dtype), targets [n] with every 17th ignored, tau [n], upstream grad [n]."""
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = (torch.randn(n, 256, device="cuda", generator=g) * 0.5).to(dtype)
    weight = (torch.randn(5120, 256, device="cuda", generator=g) * 0.1).to(dtype)
    targets = torch.randint(0, GPU_VOCAB, (n,), device="cuda", generator=g)
    targets[::17] = IGNORE
    tau = 0.3 + 2 * torch.rand(n, device="cuda", generator=g)
    return hidden, weight, targets, tau, torch.randn(n, device="cuda", generator=g)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_compiled_matches_torch_path_on_gpu(dtype):
    pytest.importorskip("triton")
    V = GPU_VOCAB
    hidden, weight, targets, tau, up = gpu_problem(1000, dtype)
    outs = {}
    for impl in ("torch", "triton"):
        outs[impl] = run_fused(hidden, weight, targets, tau, 0.5, V, up, dtype=dtype, impl=impl)
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
    assert_close_all(outs["triton"][:1] + outs["triton"][3:], outs["torch"][:1] + outs["torch"][3:], 1e-4,
                     names=("loss", "dtau"))
    assert_close_all(outs["triton"][1:3], outs["torch"][1:3], tol, names=("dE", "dC"))
    # auto picks triton on CUDA
    auto = run_fused(hidden, weight, targets, tau, 0.5, V, up, dtype=dtype)
    assert_close_all(auto, outs["triton"], 1e-2 if dtype != torch.float32 else 1e-4)


@pytest.mark.gpu
@requires_cuda
def test_tempnet_input_with_bf16_weights_on_gpu_matches_fp64():
    """The logits-free TempNet input on a GPU (C^T C on the tensor cores) against float64 on the CPU."""
    g = torch.Generator().manual_seed(0)
    N, V, V_pad, D, d = 512, 5003, 5120, 256, 32
    hidden = (torch.randn(N, D, generator=g) * 0.5).bfloat16()
    weight = (torch.randn(V_pad, D, generator=g) * 0.1).bfloat16()
    w1 = torch.randn(d, V_pad, generator=g)
    z = hidden.double() @ weight[:V].double().t()
    w1z, sq = tempnet_first_layer_logits_free(hidden.cuda(), weight.cuda(), w1.cuda(), V)
    assert rel_err(w1z.cpu().double(), z @ w1[:, :V].double().t()) < 1e-4
    assert rel_err(sq.cpu().double(), (z * z).sum(1)) < 1e-4


def test_default_chunk_size_bounds_the_working_set():
    from tempnet_kernels.dro_cce import DEFAULT_CHUNK_SIZE, default_chunk_size

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert default_chunk_size(128, cpu) == 2**21 // 128  # a few tokens: the whole vocabulary in one chunk
    assert default_chunk_size(8192, cpu) == DEFAULT_CHUNK_SIZE  # never fewer rows than this
    assert default_chunk_size(2**15, gpu) == 2**12  # 2^27 logits
    assert default_chunk_size(10**6, gpu) == 1024


def test_cpu_exp_stays_in_the_normal_range():
    """On a CPU, exp's arguments are clamped where the result would be subnormal (a slow path there, common at
    low temperatures); those terms change by less than twice the smallest normal float."""
    from tempnet_kernels.dro_cce import _EXP_FLOOR_ON_CPU, _exp_nonpositive

    s = torch.cat([-torch.logspace(-3, 4, 2000), torch.zeros(1)])
    got, exact = _exp_nonpositive(s), torch.exp(s)
    tiny = torch.finfo(torch.float32).tiny
    kept = s >= _EXP_FLOOR_ON_CPU
    assert torch.equal(got[kept], exact[kept])
    assert torch.all(got >= tiny) and torch.all(got[~kept] - exact[~kept] < 2 * tiny)
    buf = s.clone()
    assert _exp_nonpositive(buf, out=buf) is buf and torch.equal(buf, got)  # in place


# ----------------------------------------------------------------------------------------------------
# backward within a memory budget (blocks of tokens), off by default
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [1, 2_000, 10**9])  # one block of 64, blocks of 64 tokens, all tokens at once
def test_backward_within_a_memory_budget_matches_reference_fp32(budget):
    from tempnet_kernels.dro_cce import backward_token_block

    hidden, weight, targets, tau, up = make_inputs(N=150, V=37, V_pad=40, D=16, n_ignored=9)
    ref = run_reference(hidden, weight, targets, tau, 0.8, 37, up)
    got = run_fused(hidden, weight, targets, tau, 0.8, 37, up, impl="torch", chunk_size=16, backward_memory=budget)
    assert_close_all(got, ref, 1e-5)
    assert torch.all(got[2][37:] == 0)
    assert backward_token_block(budget, 16, 16) == {1: 64, 2_000: 64, 10**9: 10**9 // 256 // 64 * 64}[budget]
    default = run_fused(hidden, weight, targets, tau, 0.8, 37, up, impl="torch", chunk_size=16)
    assert torch.equal(got[0], default[0]) and torch.equal(got[3], default[3])  # loss and dtau: the same forward


def test_backward_within_a_memory_budget_bf16():
    """bf16: dC summed over the token blocks in bf16 (one rounding per block) stays within bf16 round-off."""
    hidden, weight, targets, tau, up = make_inputs(N=256, V=37, V_pad=48, D=32, n_ignored=11)
    ref = run_reference(hidden.bfloat16().double(), weight.bfloat16().double(), targets, tau, 0.5, 37, up)
    got = run_fused(hidden, weight, targets, tau, 0.5, 37, up, dtype=torch.bfloat16, impl="torch", chunk_size=16,
                    backward_memory=1)  # four blocks of 64 tokens
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    assert_close_all(got[:1] + got[3:], ref[:1] + ref[3:], 1e-5, names=("loss", "dtau"))
    assert_close_all(got[1:3], ref[1:3], 1e-2, names=("dE", "dC"))


def test_backward_within_a_memory_budget_with_filtering_and_partial_grads():
    hidden, weight, targets, tau, up = make_inputs(N=200, V=300, V_pad=320, D=16, tau_range=(0.2, 0.5))
    hidden = hidden * 3
    base = run_fused(hidden, weight, targets, tau, 0.5, 300, up, impl="torch", chunk_size=64, backward_memory=1)
    ref = run_reference(hidden, weight, targets, tau, 0.5, 300, up)
    assert_close_all(base, ref, 1e-5)
    filt = run_fused(hidden, weight, targets, tau, 0.5, 300, up, impl="torch", chunk_size=64, filter_eps=1e-6,
                     backward_memory=1)
    assert rel_err(filt[1], base[1]) < 1e-4 and rel_err(filt[2], base[2]) < 1e-4
    h = hidden.float().requires_grad_()  # dE only
    loss = linear_dro_cross_entropy(h, weight.float(), targets, tau.float(), 0.5, 300, impl="torch",
                                    chunk_size=64, backward_memory=1)
    (loss * up.float()).sum().backward()
    assert rel_err(h.grad, ref[1]) < 1e-5


@pytest.mark.parametrize("bad", [0, -5, 1.5, "1e6"])
def test_bad_backward_memory_is_refused(bad):
    hidden, weight, targets, tau, _ = make_inputs()
    with pytest.raises((ValueError, TypeError), match="backward_memory"):
        linear_dro_cross_entropy(hidden.float(), weight.float(), targets, tau.float(), 0.5, 37, backward_memory=bad)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_backward_within_a_memory_budget_on_gpu(dtype):
    """The 16-bit tensor-core path of the token-block backward against the default backward and float64."""
    V = GPU_VOCAB
    hidden, weight, targets, tau, up = gpu_problem(4096, dtype)
    ref = run_reference(hidden.cpu().double(), weight.cpu().double(), targets.cpu(), tau.cpu(), 0.5, V, up.cpu())
    default = run_fused(hidden, weight, targets, tau, 0.5, V, up, dtype=dtype)
    small = run_fused(hidden, weight, targets, tau, 0.5, V, up, dtype=dtype, backward_memory=2**22)  # 4 MiB: 64-token blocks
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for got in (default, small):
        assert_close_all([x.cpu() for x in got[1:3]], ref[1:3], tol, names=("dE", "dC"))
    assert_close_all([x.cpu() for x in small], [x.cpu() for x in default], tol)
