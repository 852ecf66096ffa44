"""Fused, vocabulary-parallel linear + DRO cross-entropy that never materialises the logits.

Per token i with hidden state e_i, classifier weight C (rows = vocabulary), logits z = e_i C^T over the
true vocabulary V, target y, temperature tau_i > 0 and DRO radius rho::

    L_i       = tau_i * (logsumexp(z / tau_i) - z_y / tau_i) + tau_i * (rho - log V)
    dL/dz_k   = softmax(z / tau_i)_k - [k = y]
    dL/dtau_i = rho - KL(softmax(z / tau_i) || uniform(V))

With tau = 1 and rho = log V this is plain cross-entropy.

How it is computed (both implementations share the math):

* Forward keeps, per token, three running statistics of s = z / tau over this rank's vocabulary shard:
  the max ``m``, ``l = sum_k exp(s_k - m)`` and ``a = sum_k exp(s_k - m) (s_k - m)``, merged online
  across vocabulary blocks, plus the target logit z_y (gathered where this shard owns the target).
  Then ``logsumexp(s) = m + log l`` and ``logsumexp(s) - E_p[s] = log l - a / l``, so
  ``dL/dtau = log l - a / l + rho - log V`` needs no second pass.
* Under vocabulary (tensor) parallelism the per-rank statistics are combined with one all-reduce MAX
  (of m) and one all-reduce SUM (of the rebased l, a and z_y), as megatron-core's
  vocab_parallel_cross_entropy does.
* Backward recomputes the logits chunk by chunk (``chunk_size`` vocabulary rows), forms
  ``g = grad_out * (p - onehot(y))`` and accumulates ``dE += g C_chunk`` and ``dC_chunk = g^T E`` with fp32
  accumulation. Chunks, not on-chip tiles: the products then run at cuBLAS speed on the tensor cores
  (on-chip tiles need atomic adds into dE and dC, about 10x slower; see _dro_cce_triton.py).

Implementations (``impl``):

* ``"torch"``: chunks over the vocabulary (``chunk_size`` rows at a time) in both passes; working memory
  is O(N * chunk_size), never N x V. Runs anywhere (CPU, CUDA).
* ``"triton"``: the forward statistics from tiles of tokens x vocabulary computed on chip (see
  ``_dro_cce_triton.py``: no logits memory at all); the backward is the chunked one. Needs CUDA tensors,
  or ``TRITON_INTERPRET=1`` set before triton is first imported (then it runs, slowly, on CPU tensors;
  used by the tests).
* ``"auto"``: triton for CUDA tensors when triton imports, torch otherwise.

Tensor-parallel gradient convention (same as megatron-core's ColumnParallelLinear output layer):

* the gradient returned for ``hidden`` is this rank's *partial* dE (the sum over its vocabulary
  shard only). The caller must pass ``hidden`` through
  ``megatron.core.tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=tp_group)``
  before calling, whose backward all-reduces dE across the group (ColumnParallelLinear does exactly
  this for its input). Summing the partials over ranks gives the single-rank dE;
* the gradient for ``weight`` is local to the shard (padded rows get zero gradient);
* the gradient for ``tau`` is the full value, identical on every rank, as is the returned loss.
"""
# Over 500 lines: one fused loss's forward, backward, TP combination and chunked torch twin, which must change together.
from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

__all__ = [
    "linear_dro_cross_entropy",
    "vocab_parallel_logit_max",
    "tempnet_first_layer_logits_free",
    "classifier_statistics",
    "ClassifierStatistics",
    "W1GradientAccumulator",
    "DEFAULT_CHUNK_SIZE",
    "default_chunk_size",
    "LOW_MEMORY_CHUNK_SIZE",
    "backward_token_block",
]

#: exp(x) below about -87.3 is subnormal or zero in fp32, where torch's vectorised CPU exp is 10-30x slower (AVX-512,
#: AMD EPYC). Low temperatures put most of the vocabulary there. Clamping first changes each such softmax term by at
#: most exp(-87) = 1.6e-38, far below the resolution of its sum, which holds exp(0) = 1.
_EXP_FLOOR_ON_CPU = -87.0


def _exp_nonpositive(s: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """exp(s) for s <= 0, into `out` (may be s itself); on a CPU clamped into the normal range first."""
    if s.is_cuda:
        return torch.exp(s, out=out)
    return torch.clamp(s, min=_EXP_FLOOR_ON_CPU, out=out).exp_()


#: Fewest vocabulary rows per chunk of the torch path on a CPU. Working memory is about 2 * N * chunk_size * 4
#: bytes (N = tokens), e.g. 32 MiB for N = 8192.
DEFAULT_CHUNK_SIZE = 512


def default_chunk_size(n_tokens: int, device: torch.device) -> int:
    """Vocabulary rows per chunk of the torch path. On a CPU, chunks of up to 2^21 logits (8 MiB in fp32, a
    cache-sized working set), at least DEFAULT_CHUNK_SIZE rows: few tokens take the whole vocabulary at once
    (each chunk costs a few dozen small ops). On a GPU, chunks of up to 2^27 logits (512 MiB), 1024..8192
    rows, so that each product is big enough for the tensor cores."""
    if device.type != "cuda":
        return max(DEFAULT_CHUNK_SIZE, 2**21 // max(1, n_tokens))
    return max(1024, min(8192, 2**27 // max(1, n_tokens)))

#: Vocabulary rows per chunk when the backward works within a memory budget (linear_dro_cross_entropy's
#: backward_memory): 2048 rows keep the three products per chunk large enough for the tensor cores.
LOW_MEMORY_CHUNK_SIZE = 2048


def backward_token_block(budget_bytes: int, chunk_size: int, hidden_size: int) -> int:
    """Tokens per block of the backward so that its working memory, block * (6 chunk + 10 D) bytes (16-bit CUDA
    inputs), fits budget_bytes: a multiple of 64, at least 64."""
    per_token = 6 * chunk_size + 10 * hidden_size
    return max(64, budget_bytes // per_token // 64 * 64)


#: Counts of the backward's gradient filtering (vocabulary rows x chunks seen / skipped), for benchmarks.
FILTER_STATS = {"rows_total": 0, "rows_skipped": 0}


# ----------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------
def _tp_size(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _num_valid_rows(v_local: int, vocab_size: int, vocab_start_index: int) -> int:
    """Rows of this shard whose global id is < vocab_size (the rest is padding, masked out)."""
    return max(0, min(v_local, vocab_size - vocab_start_index))


def _check_common(hidden, weight, vocab_size, vocab_start_index, tp_group, chunk_size):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise ValueError("hidden must be a tensor of shape [..., D] (e.g. [N, D] or [s, b, D])")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating-point tensor, got dtype {hidden.dtype}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 2-D tensor [V_local, D] (this rank's vocabulary rows), got {shape}")
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"hidden and weight must have the same dtype, got hidden {hidden.dtype} and weight {weight.dtype}; "
            "cast one of them (e.g. hidden.to(weight.dtype))"
        )
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"hidden size mismatch: hidden has D={hidden.shape[-1]} (last dim) but weight has D={weight.shape[1]} "
            "(weight must be [V_local, D], not transposed)"
        )
    if weight.device != hidden.device:
        raise ValueError(f"hidden is on {hidden.device} but weight is on {weight.device}; move them to one device")
    if int(vocab_size) != vocab_size or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive int (the true, unpadded vocabulary), got {vocab_size!r}")
    if int(vocab_start_index) != vocab_start_index or vocab_start_index < 0:
        raise ValueError(f"vocab_start_index must be an int >= 0, got {vocab_start_index!r}")
    if _tp_size(tp_group) == 1 and vocab_start_index + weight.shape[0] < vocab_size:
        raise ValueError(
            f"weight has {weight.shape[0]} rows starting at vocab_start_index={vocab_start_index} but "
            f"vocab_size={vocab_size} and there is no tensor-parallel group: without tp_group the weight must "
            "cover the whole vocabulary (pass tp_group for a vocabulary shard)"
        )
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _check_loss_inputs(hidden, weight, targets, tau, rho, vocab_size, ignore_index, impl, filter_eps):
    lead = tuple(hidden.shape[:-1])
    if not isinstance(targets, torch.Tensor):
        raise ValueError("targets must be an integer tensor of token ids")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor (int64 vocabulary ids), got dtype {targets.dtype}")
    if tuple(targets.shape) != lead:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden's leading shape {lead}")
    if not isinstance(tau, torch.Tensor):
        raise ValueError("tau must be a tensor of per-token temperatures (use torch.ones(N) for tau = 1)")
    if not tau.is_floating_point():
        raise ValueError(f"tau must be a floating-point tensor, got dtype {tau.dtype}")
    if tuple(tau.shape) != lead:
        raise ValueError(f"tau shape {tuple(tau.shape)} must equal hidden's leading shape {lead} (one per token)")
    for name, t in (("targets", targets), ("tau", tau)):
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}; move it to one device")
    if isinstance(rho, torch.Tensor):
        if rho.numel() != 1:
            raise ValueError("rho must be a scalar (float)")
        rho = float(rho)
    if not math.isfinite(float(rho)):
        raise ValueError(f"rho must be a finite float, got {rho!r}")
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if filter_eps is not None and (not math.isfinite(float(filter_eps)) or filter_eps < 0):
        raise ValueError(f"filter_eps must be None (no filtering) or a float >= 0, got {filter_eps!r}")
    # Value checks: one host sync for all of them.
    valid = targets != ignore_index
    bad_target = (valid & ((targets < 0) | (targets >= vocab_size))).any()
    bad_tau = (valid & ~(torch.isfinite(tau) & (tau > 0))).any()
    bad_target, bad_tau = torch.stack([bad_target, bad_tau]).tolist()
    if bad_target:
        t = targets[valid & ((targets < 0) | (targets >= vocab_size))]
        raise ValueError(
            f"targets must be in [0, vocab_size={vocab_size}) or equal ignore_index={ignore_index}; "
            f"found {t.numel()} out-of-range ids, e.g. {t[:4].tolist()}"
        )
    if bad_tau:
        t = tau[valid & ~(torch.isfinite(tau) & (tau > 0))]
        raise ValueError(
            f"tau must be finite and > 0 for every non-ignored token; found {t.numel()} bad values, "
            f"e.g. {t[:4].tolist()} (bound it, e.g. tau_min + (tau_max - tau_min) * sigmoid(.))"
        )
    return float(rho)


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl == "torch":
        return "torch"
    if impl == "auto":
        if device.type != "cuda":
            return "torch"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"
    # impl == "triton"
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - triton is a dev dependency
        raise ValueError("impl='triton' needs the triton package (pip install triton); use impl='torch'") from exc
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            f"impl='triton' needs CUDA tensors (got {device}); on CPU use impl='torch', or set TRITON_INTERPRET=1 "
            "before triton is imported to run the kernel in Triton's interpreter"
        )
    return "triton"


# ----------------------------------------------------------------------------------------------------
# statistics: merging blocks and ranks
# ----------------------------------------------------------------------------------------------------
def _rebase(m, l, a, new_m):
    """Express (l, a), taken relative to max m, relative to new_m >= m. Rows with l == 0 stay 0."""
    has = l > 0
    d = torch.where(has, m - new_m, torch.zeros_like(m))
    w = torch.exp(d)
    return l * w, (a + d * l) * w


def _merge(m1, l1, a1, m2, l2, a2):
    m = torch.maximum(m1, m2)
    l1, a1 = _rebase(m1, l1, a1, m)
    l2, a2 = _rebase(m2, l2, a2, m)
    return m, l1 + l2, a1 + a2


def _merge_rows(m, l, a):
    """Merge statistics stacked along dim 0 ([S, N] -> [N])."""
    mx = m.amax(0)
    l, a = _rebase(m, l, a, mx.unsqueeze(0).expand_as(m))
    return mx, l.sum(0), a.sum(0)


def _combine_tp(m, l, a, zy, group):
    """All-reduce MAX then SUM of the per-rank statistics (vocabulary parallelism)."""
    if _tp_size(group) == 1:
        return m, l, a, zy
    mx = m.clone()
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
    l, a = _rebase(m, l, a, mx)
    buf = torch.stack([l, a, zy])
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return mx, buf[0], buf[1], buf[2]


# ----------------------------------------------------------------------------------------------------
# torch (chunked) implementation
# ----------------------------------------------------------------------------------------------------
def _tensor_core_operands(E) -> bool:
    """16-bit CUDA inputs multiply in 16 bit with fp32 accumulation and fp32 output (tensor cores, the
    Triton kernel's precision); everything else is upcast to fp32 first."""
    return E.is_cuda and E.dtype != torch.float32


def _chunk_logits(E, Cc):
    """[N, c] fp32 logits E Cc^T of one vocabulary chunk (E as returned by _operand)."""
    if E.dtype == torch.float32:
        return E @ Cc.float().t()
    return torch.mm(E, Cc.t(), out_dtype=torch.float32)


def _operand(E):
    return E if _tensor_core_operands(E) else E.float()


def _torch_forward_stats(E, C, inv_tau, tgt_local, n_valid, chunk):
    """Per-token (m, l, a, z_y) over rows [0, n_valid) of this shard, chunk rows at a time."""
    N = E.shape[0]
    dev = E.device
    zy = torch.zeros(N, dtype=torch.float32, device=dev)
    stats = None  # (m, l, a) of the chunks so far
    E = _operand(E)
    for c0 in range(0, n_valid, chunk):
        c1 = min(c0 + chunk, n_valid)
        s = _chunk_logits(E, C[c0:c1])  # [N, c] logits z of this chunk
        idx = tgt_local - c0
        here = (idx >= 0) & (idx < c1 - c0)
        zy += torch.where(here, s.gather(1, idx.clamp(0, c1 - c0 - 1).unsqueeze(1)).squeeze(1), 0.0)
        s.mul_(inv_tau.unsqueeze(1))  # s = z / tau
        mc = s.amax(1)
        s.sub_(mc.unsqueeze(1))  # s - m_c <= 0
        p = _exp_nonpositive(s)
        lc = p.sum(1)
        ac = torch.bmm(p.unsqueeze(1), s.unsqueeze(2)).view(N)  # sum p (s - m_c), no extra [N, c] buffer
        del s, p
        stats = (mc, lc, ac) if stats is None else _merge(*stats, mc, lc, ac)
    if stats is None:  # a shard of padding only
        stats = (torch.full((N,), float("-inf"), dtype=torch.float32, device=dev),
                 torch.zeros(N, dtype=torch.float32, device=dev), torch.zeros(N, dtype=torch.float32, device=dev))
    return (*stats, zy)


def _softmax_minus_onehot(E, Cc, inv_tau, lse, tgt_local, c0, c1):
    """[n, c] fp32 softmax(z / tau) - onehot(y) on vocabulary rows [c0, c1) of this shard (E, Cc as operands)."""
    g = _chunk_logits(E, Cc)
    g.mul_(inv_tau.unsqueeze(1)).sub_(lse.unsqueeze(1))
    _exp_nonpositive(g, out=g)  # p = softmax(z / tau) on this chunk
    idx = tgt_local - c0
    here = (idx >= 0) & (idx < c1 - c0)
    g.scatter_add_(1, idx.clamp(0, c1 - c0 - 1).unsqueeze(1), -here.float().unsqueeze(1))  # p - onehot(y)
    return g


def _chunked_backward(E, C, inv_tau, lse, gscale, tgt_local, n_valid, chunk, filter_eps, need_dE, need_dC,
                      token_block=None):
    """(dE, dC): the logits recomputed chunk rows of the vocabulary at a time, for blocks of token_block tokens
    (None: all tokens at once, the fastest). With token blocks, dE is accumulated in fp32 per block and dC is
    summed over the blocks in C's dtype (one rounding per block in 16 bit); the working memory is then about
    token_block * (6 chunk + 10 D) bytes instead of N * (6 chunk + 10 D) (16-bit CUDA inputs)."""
    N, D = E.shape
    nb = N if token_block is None else max(1, min(int(token_block), N))
    low = _tensor_core_operands(E)
    Eop = _operand(E)
    dE = (torch.empty_like(E) if nb < N else None) if need_dE else None
    dC = torch.zeros_like(C) if need_dC else None
    for i0 in range(0, N, nb):
        i1 = min(i0 + nb, N)
        dEb = _token_block_backward(Eop[i0:i1], C, inv_tau[i0:i1], lse[i0:i1], gscale[i0:i1], tgt_local[i0:i1],
                                    n_valid, chunk, filter_eps, need_dE, need_dC, low, dC, first=i0 == 0)
        if need_dE:
            if nb == N:
                dE = dEb.to(E.dtype)
            else:
                dE[i0:i1] = dEb
        del dEb
    return dE, dC


def _token_block_backward(E, C, inv_tau, lse, gscale, tgt_local, n_valid, chunk, filter_eps, need_dE, need_dC,
                          low, dC, first):
    """One block of tokens: returns its fp32 dE rows and adds its share of dC into `dC` (writes it if `first`)."""
    n, D = E.shape
    dE32 = torch.zeros(n, D, dtype=torch.float32, device=E.device) if need_dE else None
    active = (gscale != 0).float().unsqueeze(1)
    # 16-bit CUDA inputs: the products run in 16 bit with fp32 accumulation, and the per-token grad scale stays
    # out of the 16-bit operands (applied after the dE product, folded into E for dC), as in the Triton kernel.
    Es = (E.float() * gscale.unsqueeze(1)).to(E.dtype) if low and need_dC else None
    for c0 in range(0, n_valid, chunk):
        c1 = min(c0 + chunk, n_valid)
        Cc = C[c0:c1] if low else C[c0:c1].float()
        g = _softmax_minus_onehot(E, Cc, inv_tau, lse, tgt_local, c0, c1)
        rows = None
        if filter_eps is not None:
            g.mul_(active)  # ignored tokens do not count
            mag = torch.maximum(g.amax(0), -g.amin(0))  # max_i |p_ik - [k = y_i]| per vocabulary row
            keep = mag >= filter_eps
            n_keep = int(keep.sum())
            FILTER_STATS["rows_total"] += c1 - c0
            FILTER_STATS["rows_skipped"] += c1 - c0 - n_keep
            if n_keep < c1 - c0:
                rows = keep.nonzero().squeeze(1)
                g = g.index_select(1, rows)
                Cc = Cc.index_select(0, rows)
        if low:
            g = g.to(E.dtype)
            if need_dE:
                dE32.add_(torch.mm(g, Cc, out_dtype=torch.float32).mul_(gscale.unsqueeze(1)))
            dCc = g.t() @ Es if need_dC else None
        else:
            g.mul_(gscale.unsqueeze(1))
            if need_dE:
                dE32.addmm_(g, Cc)
            dCc = (g.t() @ E).to(C.dtype) if need_dC else None
        if need_dC:  # the first block writes its rows, later ones add to them (one rounding each in 16 bit)
            dCc = dCc.to(C.dtype)
            if rows is None:
                dC[c0:c1] = dCc if first else dC[c0:c1] + dCc
            elif first:
                dC[c0:c1].index_copy_(0, rows, dCc)
            else:
                dC[c0:c1].index_add_(0, rows, dCc)
        del g, Cc
    return dE32


# ----------------------------------------------------------------------------------------------------
# autograd function
# ----------------------------------------------------------------------------------------------------
class _LinearDROCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, tau, targets, rho, vocab_size, vocab_start_index, tp_group,
                ignore_index, impl, chunk_size, filter_eps, token_block):
        valid = targets != ignore_index
        # Ignored tokens get tau = 1 internally so that nothing there can produce inf/nan.
        tau32 = torch.where(valid, tau.float(), torch.ones((), dtype=torch.float32, device=tau.device))
        inv_tau = 1.0 / tau32
        n_valid = _num_valid_rows(weight.shape[0], vocab_size, vocab_start_index)
        tgt_local = targets - vocab_start_index
        tgt_local = torch.where(valid & (tgt_local >= 0) & (tgt_local < n_valid), tgt_local,
                                torch.full_like(tgt_local, -1))
        if impl == "triton":
            from . import _dro_cce_triton as tk

            m, l, a, zy = tk.forward_stats(hidden, weight, inv_tau, tgt_local, n_valid)
        else:
            m, l, a, zy = _torch_forward_stats(hidden, weight, inv_tau, tgt_local, n_valid, chunk_size)
        m, l, a, zy = _combine_tp(m, l, a, zy, tp_group)

        log_l = torch.log(l)
        lse = m + log_l  # logsumexp(z / tau)
        shift = rho - math.log(vocab_size)
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        loss = torch.where(valid, tau32 * lse - zy + tau32 * shift, zero)
        dldtau = torch.where(valid, log_l - a / l + shift, zero)  # = rho - KL(p || uniform)

        ctx.save_for_backward(hidden, weight, inv_tau, lse, tgt_local, valid, dldtau)
        ctx.n_valid = n_valid
        ctx.chunk_size = chunk_size
        ctx.filter_eps = filter_eps
        ctx.token_block = token_block
        ctx.tau_dtype = tau.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        hidden, weight, inv_tau, lse, tgt_local, valid, dldtau = ctx.saved_tensors
        gscale = torch.where(valid, grad_loss.float(), torch.zeros((), device=grad_loss.device)).contiguous()
        need_dE, need_dC, need_dtau = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dE = dC = dtau = None
        if need_dE or need_dC:
            dE, dC = _chunked_backward(hidden, weight, inv_tau, lse, gscale, tgt_local, ctx.n_valid,
                                       ctx.chunk_size, ctx.filter_eps, need_dE, need_dC, ctx.token_block)
        if need_dtau:
            dtau = (gscale * dldtau).to(ctx.tau_dtype)
        return dE, dC, dtau, None, None, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------
def linear_dro_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    tau: torch.Tensor,
    rho: float,
    vocab_size: int,
    *,
    vocab_start_index: int = 0,
    tp_group: Optional["dist.ProcessGroup"] = None,
    ignore_index: int = -100,
    impl: str = "auto",
    chunk_size: Optional[int] = None,
    filter_eps: Optional[float] = None,
    backward_memory: Optional[int] = None,
) -> torch.Tensor:
    """Per-token DRO loss of ``hidden @ weight.T`` without materialising the logits.

    Args:
        hidden: [..., D] final hidden states E (e.g. [N, D] or [s, b, D]); any float dtype, fp32 math.
            Under tensor parallelism pass it through
            ``megatron.core.tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=tp_group)``
            first: the gradient this function returns for it is the partial dE of this vocabulary shard.
        weight: [V_local, D] this rank's rows of the output (classifier) weight C, same dtype as hidden.
            Rows whose global id (vocab_start_index + row) is >= vocab_size are padding: masked out of the
            softmax, zero gradient.
        targets: [...] integer global vocabulary ids in [0, vocab_size), or ignore_index.
        tau: [...] per-token temperatures, finite and > 0 on non-ignored tokens; differentiable.
        rho: DRO radius (float). tau = 1 and rho = log(vocab_size) give plain cross-entropy.
        vocab_size: the true (unpadded, global) vocabulary size V.
        vocab_start_index: global id of weight row 0 on this rank.
        tp_group: vocabulary-parallel process group; None or size 1 = no parallelism.
        ignore_index: targets equal to it give loss 0 and zero gradients.
        impl: "auto" (triton for CUDA tensors, torch elsewhere), "torch" or "triton".
        chunk_size: vocabulary rows per chunk in the backward and the torch forward (memory ~ 2 * N *
            chunk_size * 4 bytes); None: ``default_chunk_size``.
        filter_eps: if set, gradient blocks whose entries |softmax(z/tau)_k - [k = y]| are all below it are
            skipped in backward (as Cut Cross-Entropy does), per vocabulary row of a chunk over all tokens.
            Loss and dtau are exact.
        backward_memory: None (default, the fastest): the backward takes all N tokens at once, working memory
            about N * (6 chunk_size + 10 D) bytes for 16-bit CUDA inputs (fp32 dE accumulator, 16-bit E scaled
            by the grad, the fp32 and 16-bit gradient chunk). An int: the backward's working-memory budget in
            bytes; it then takes blocks of tokens (``backward_token_block``; chunk_size defaults to at most
            LOW_MEMORY_CHUNK_SIZE) and sums dC over the blocks in weight's dtype (one rounding per block in
            16 bit; dE and dtau as before). The Triton forward holds no logits; the torch forward's chunks stay
            N x chunk_size.

    Returns:
        [...] per-token loss in fp32 (0 where ignored), identical on all tensor-parallel ranks;
        differentiable w.r.t. hidden (partial dE under TP), weight (local shard) and tau (full value).
    """
    n_tokens = hidden.numel() // max(1, hidden.shape[-1])
    if backward_memory is not None and (not isinstance(backward_memory, int) or isinstance(backward_memory, bool)
                                        or backward_memory < 1):
        raise ValueError(f"backward_memory must be None or a positive number of bytes, got {backward_memory!r}")
    if chunk_size is None:
        chunk_size = default_chunk_size(n_tokens, hidden.device)
        if backward_memory is not None:
            chunk_size = min(chunk_size, LOW_MEMORY_CHUNK_SIZE)
    _check_common(hidden, weight, vocab_size, vocab_start_index, tp_group, chunk_size)
    token_block = (None if backward_memory is None
                   else backward_token_block(int(backward_memory), int(chunk_size), hidden.shape[-1]))
    rho = _check_loss_inputs(hidden, weight, targets, tau, rho, vocab_size, ignore_index, impl, filter_eps)
    impl = _resolve_impl(impl, hidden.device)
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    loss = _LinearDROCrossEntropy.apply(
        h2, weight, tau.reshape(-1), targets.reshape(-1).long(), rho, int(vocab_size), int(vocab_start_index),
        tp_group, int(ignore_index), impl, int(chunk_size), None if filter_eps is None else float(filter_eps),
        token_block,
    )
    return loss.view(lead)


@torch.no_grad()
def vocab_parallel_logit_max(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    vocab_size: int,
    *,
    vocab_start_index: int = 0,
    tp_group: Optional["dist.ProcessGroup"] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """[...] fp32 max_k z_k over the true vocabulary (all ranks), z = hidden @ weight.T; no grad.

    Chunked over the vocabulary (never materialises N x V); one all-reduce MAX under tensor parallelism.
    """
    _check_common(hidden, weight, vocab_size, vocab_start_index, tp_group, chunk_size)
    lead = hidden.shape[:-1]
    E32 = hidden.reshape(-1, hidden.shape[-1]).float()
    n_valid = _num_valid_rows(weight.shape[0], vocab_size, vocab_start_index)
    mx = torch.full((E32.shape[0],), float("-inf"), dtype=torch.float32, device=hidden.device)
    for c0 in range(0, n_valid, chunk_size):
        c1 = min(c0 + chunk_size, n_valid)
        torch.maximum(mx, (E32 @ weight[c0:c1].float().t()).amax(1), out=mx)
    if _tp_size(tp_group) > 1:
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=tp_group)
    return mx.view(lead)


class ClassifierStatistics(NamedTuple):
    """Products of TempNet's W1 and the classifier C that the logits-free input needs, summed over the
    vocabulary-parallel group, fp32, no gradient. They depend on the weights only, so one set serves every
    micro-batch of an optimizer step."""

    w1c: torch.Tensor  # [d, D] W1[:, :V] C[:V]
    gram: torch.Tensor  # [D, D] C^T C over the true vocabulary
    csum: torch.Tensor  # [D] the sum of C's rows
    w1_rowsum: torch.Tensor  # [d] W1 1 over the true vocabulary


@torch.no_grad()
def classifier_statistics(
    weight: torch.Tensor,
    w1_shard: torch.Tensor,
    vocab_size: int,
    vocab_start_index: int = 0,
    tp_group: Optional["dist.ProcessGroup"] = None,
    *,
    chunk_size: int = 4096,
) -> ClassifierStatistics:
    """W1 C, C^T C, sum of C's rows and W1 1 over the true vocabulary, chunked; one all-reduce under TP.

    weight: [V_local, D] this rank's classifier rows; w1_shard: [d, V_local] TempNet's W1 columns for them.
    16-bit weights on a GPU multiply on the tensor cores (exact products, fp32 sums); the rest in fp32.
    """
    _check_common(weight.new_empty(1, weight.shape[1]), weight, vocab_size, vocab_start_index, tp_group, chunk_size)
    if w1_shard.dim() != 2 or w1_shard.shape[1] != weight.shape[0]:
        raise ValueError(
            f"w1_shard must be [d, V_local] with V_local = weight.shape[0] = {weight.shape[0]}, "
            f"got {tuple(w1_shard.shape)}"
        )
    if w1_shard.device != weight.device:
        raise ValueError(f"w1_shard is on {w1_shard.device} but weight is on {weight.device}")
    n_valid = _num_valid_rows(weight.shape[0], vocab_size, vocab_start_index)
    d, D = w1_shard.shape[0], weight.shape[1]
    f32 = dict(dtype=torch.float32, device=weight.device)
    w1c, gram, csum = torch.zeros(d, D, **f32), torch.zeros(D, D, **f32), torch.zeros(D, **f32)
    for c0 in range(0, n_valid, chunk_size):
        c1 = min(c0 + chunk_size, n_valid)
        w1c.addmm_(w1_shard[:, c0:c1].float(), weight[c0:c1].float())
        Ct = _operand(weight[c0:c1].t())  # [D, c]
        gram += _chunk_logits(Ct, Ct)  # C_c^T C_c
        csum += Ct.float().sum(1)
    w1_rowsum = w1_shard[:, :n_valid].float().sum(1)
    packed = torch.cat([w1c.reshape(-1), gram.reshape(-1), csum, w1_rowsum])
    if _tp_size(tp_group) > 1:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
    w1c, gram, csum, w1_rowsum = torch.split(packed, [d * D, D * D, D, d])
    return ClassifierStatistics(w1c.view(d, D), gram.view(D, D), csum, w1_rowsum)


class W1GradientAccumulator:
    """Sums the upstream gradients dL/d(W1 C) [d, D] and dL/d(W1 1) [d] over the micro-batches of one optimizer
    step, so that W1's gradient, their product with C^T (d x D x V), is formed once per step instead of once per
    micro-batch. The last of `backward_passes` micro-batch backward passes returns it for all of them; the
    others return none. Exact up to the order of the float sums."""

    def __init__(self, backward_passes: int):
        if backward_passes < 1:
            raise ValueError(f"backward_passes must be >= 1, got {backward_passes}")
        self.backward_passes = backward_passes
        self.seen = 0
        self.g_w1c: Optional[torch.Tensor] = None
        self.g_rowsum: Optional[torch.Tensor] = None

    @staticmethod
    def _sum(total, g):
        if g is None:
            return total
        return g.to(torch.float32, copy=True) if total is None else total.add_(g.float())

    def add(self, g_w1c: Optional[torch.Tensor], g_rowsum: Optional[torch.Tensor]) -> bool:
        """Add one micro-batch's upstream gradients; True when that was the step's last backward pass."""
        if self.seen >= self.backward_passes:
            raise RuntimeError(f"TempNet's W1 gradient: more than the {self.backward_passes} micro-batch backward "
                               "passes this step was set up for; pass the step's number of micro-batches")
        self.g_w1c = self._sum(self.g_w1c, g_w1c)
        self.g_rowsum = self._sum(self.g_rowsum, g_rowsum)
        self.seen += 1
        return self.seen == self.backward_passes

    @property
    def pending(self) -> bool:
        """Gradients were added but W1's has not been returned yet."""
        return 0 < self.seen < self.backward_passes


class _W1Products(torch.autograd.Function):
    """Gives the precomputed (W1 C, W1 1) a gradient path to this rank's W1 columns (C is detached).

    Backward: dW1[:, :n] = dW1C C[:n]^T + dW1_1 (broadcast), chunked; padded columns get zero; with an
    accumulator, once per step (see W1GradientAccumulator). Under TP the forward values are already summed over
    the group and each rank's columns get their own gradient.
    """

    @staticmethod
    def forward(ctx, w1, weight, w1c, w1_rowsum, n_valid, chunk, accumulator):
        ctx.save_for_backward(weight)
        ctx.n_valid, ctx.chunk, ctx.w1_shape, ctx.w1_dtype = n_valid, chunk, w1.shape, w1.dtype
        ctx.accumulator = accumulator
        return w1c.clone(), w1_rowsum.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g_w1c, g_rowsum):
        no_grads = (None,) * 6
        if ctx.accumulator is not None:
            if not ctx.accumulator.add(g_w1c, g_rowsum):
                return (None, *no_grads)  # W1's gradient comes with the step's last micro-batch
            g_w1c, g_rowsum = ctx.accumulator.g_w1c, ctx.accumulator.g_rowsum
        (weight,) = ctx.saved_tensors
        dw1 = torch.zeros(ctx.w1_shape, dtype=torch.float32, device=weight.device)
        if g_w1c is not None:
            g = g_w1c.float()
            for c0 in range(0, ctx.n_valid, ctx.chunk):
                c1 = min(c0 + ctx.chunk, ctx.n_valid)
                dw1[:, c0:c1] = g @ weight[c0:c1].float().t()
        if g_rowsum is not None:
            dw1[:, :ctx.n_valid] += g_rowsum.float().unsqueeze(1)
        return (dw1.to(ctx.w1_dtype), *no_grads)


def tempnet_first_layer_logits_free(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    w1_shard: torch.Tensor,
    vocab_size: int,
    vocab_start_index: int = 0,
    tp_group: Optional["dist.ProcessGroup"] = None,
    *,
    shift: Optional[torch.Tensor] = None,
    chunk_size: int = 4096,
    stats: Optional[ClassifierStatistics] = None,
    w1_grad_accumulator: Optional[W1GradientAccumulator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """TempNet's first layer on the logits without the logits: returns (W1 z' [..., d], ||z'||^2 [...]).

    z = hidden @ C^T over the true vocabulary (all ranks), z' = z - shift (per token; shift=None means 0,
    the GPT-2 variant; pass ``vocab_parallel_logit_max(...)`` for the LLaMA max-shift variant). Uses
    W1 z = (W1 C) e and ||z||^2 = e^T (C^T C) e (``classifier_statistics``: a d x D and a D x D matrix). The
    TempNet input x = z'/||z'|| is then ``W1x = out / sq.sqrt().unsqueeze(-1)``.

    Args:
        hidden, weight: as in linear_dro_cross_entropy; both are treated as detached (TempNet never sends
            gradient into the LM through its input).
        w1_shard: [d, V_local] the columns of TempNet's W1 for this rank's vocabulary rows; gets gradient
            (under TP each rank gets the gradient of its own columns; padded columns get zero).
        shift: optional [...] per-token shift (no grad).
        stats: ``classifier_statistics`` of these very weights, to reuse across micro-batches; None computes them.
        w1_grad_accumulator: forms W1's gradient once for all micro-batches of a step (W1GradientAccumulator);
            None: in this call's backward.
    Math in fp32. ``||z'||^2`` with a shift is formed as ||z||^2 - 2 m sum(z) + m^2 V, which loses relative
    precision when the logits are nearly constant across the vocabulary.
    """
    _check_common(hidden, weight, vocab_size, vocab_start_index, tp_group, chunk_size)
    lead = hidden.shape[:-1]
    if shift is not None and tuple(shift.shape) != tuple(lead):
        raise ValueError(f"shift shape {tuple(shift.shape)} must equal hidden's leading shape {tuple(lead)}")
    Cd = weight.detach()
    if stats is None:
        stats = classifier_statistics(Cd, w1_shard.detach(), vocab_size, vocab_start_index, tp_group,
                                      chunk_size=chunk_size)
    n_valid = _num_valid_rows(weight.shape[0], vocab_size, vocab_start_index)
    w1c, w1_rowsum = _W1Products.apply(w1_shard, Cd, stats.w1c, stats.w1_rowsum, n_valid, chunk_size,
                                       w1_grad_accumulator)
    E32 = hidden.detach().reshape(-1, hidden.shape[-1]).float()
    w1z = E32 @ w1c.t()  # [N, d]
    with torch.no_grad():
        sq = torch.empty(E32.shape[0], dtype=torch.float32, device=E32.device)
        for i0 in range(0, E32.shape[0], chunk_size):
            Ei = E32[i0:i0 + chunk_size]
            sq[i0:i0 + chunk_size] = ((Ei @ stats.gram) * Ei).sum(1)
        if shift is not None:
            m = shift.reshape(-1).float().detach()
            sq = sq - 2.0 * m * (E32 @ stats.csum) + m * m * float(vocab_size)
    if shift is not None:
        w1z = w1z - shift.reshape(-1, 1).float().detach() * w1_rowsum.unsqueeze(0)
    return w1z.view(*lead, w1z.shape[-1]), sq.view(lead)
