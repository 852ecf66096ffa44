"""The reference DRO loss against the formula written out on one device (docs/design.md, "The DRO loss")."""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import spawn

V, PADDED = 50, 64


def direct_dro(z, y, tau, rho, vocab_size):
    """L = tau * (logsumexp(z/tau) - z_y/tau) + tau * (rho - log V), over the true vocabulary only."""
    z = z[..., :vocab_size].double()
    tau = tau.double()
    s = z / tau.unsqueeze(-1)
    return tau * (torch.logsumexp(s, -1) - s.gather(-1, y.unsqueeze(-1)).squeeze(-1)) + tau * (rho - math.log(vocab_size))


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(6, 3, PADDED, generator=g) * 3).requires_grad_()
    y = torch.randint(0, V, (6, 3), generator=g)
    tau = (torch.rand(6, 3, generator=g) * 2 + 0.2).requires_grad_()
    return z, y, tau


def test_value_and_gradients_match_direct_formula(single_rank):
    from megatron_tempnet.loss import dro_loss

    z, y, tau = _inputs()
    rho = 2.5
    loss = dro_loss(z, y, tau, rho, V)
    gz, gt = torch.autograd.grad(loss.sum(), (z, tau))
    z2, tau2 = z.detach().double().requires_grad_(), tau.detach().double().requires_grad_()
    ref = direct_dro(z2, y, tau2, rho, V)
    rz, rt = torch.autograd.grad(ref.sum(), (z2, tau2))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gz.double(), rz, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gt.double(), rt, rtol=1e-5, atol=1e-6)


def test_logit_gradient_is_softmax_minus_onehot(single_rank):
    from megatron_tempnet.loss import dro_loss

    z, y, tau = _inputs(1)
    (gz,) = torch.autograd.grad(dro_loss(z, y, tau, 1.0, V).sum(), z)
    p = F.softmax(z.detach()[..., :V] / tau.detach().unsqueeze(-1), -1)
    expected = p - F.one_hot(y, V).float()
    torch.testing.assert_close(gz[..., :V], expected, rtol=1e-5, atol=1e-6)


def test_tau_gradient_is_rho_minus_kl_to_uniform(single_rank):
    from megatron_tempnet.loss import dro_loss

    z, y, tau = _inputs(2)
    rho = 3.0
    (gt,) = torch.autograd.grad(dro_loss(z, y, tau, rho, V).sum(), tau)
    p = F.softmax(z.detach()[..., :V].double() / tau.detach().double().unsqueeze(-1), -1)
    kl = (p * (p.log() + math.log(V))).sum(-1)
    torch.testing.assert_close(gt.double(), rho - kl, rtol=1e-5, atol=1e-6)


def test_tau_one_and_rho_log_v_is_cross_entropy(single_rank):
    from megatron_tempnet.loss import default_rho, dro_loss

    z, y, _ = _inputs(3)
    ce = F.cross_entropy(z[..., :V].reshape(-1, V), y.reshape(-1), reduction="none").view_as(y)
    torch.testing.assert_close(dro_loss(z, y, torch.ones_like(ce), default_rho(V), V), ce, rtol=1e-6, atol=1e-6)
    # The no-TempNet baseline (tau=None) is cross-entropy exactly, same code path.
    assert torch.equal(dro_loss(z, y, None, default_rho(V), V), dro_loss(z, y, None, default_rho(V), V))
    torch.testing.assert_close(dro_loss(z, y, None, default_rho(V), V), ce, rtol=1e-6, atol=1e-6)


def test_padded_vocabulary_entries_change_nothing(single_rank):
    from megatron_tempnet.loss import dro_loss

    z, y, tau = _inputs(4)
    z_other = z.detach().clone()
    z_other[..., V:] = 1e4  # huge logits in the padding must not take probability mass
    z_other.requires_grad_()
    a = dro_loss(z, y, tau, 2.0, V)
    b = dro_loss(z_other, y, tau, 2.0, V)
    torch.testing.assert_close(a, b)
    (gz,) = torch.autograd.grad(b.sum(), z_other)
    assert torch.count_nonzero(gz[..., V:]) == 0


def _tp2_loss(z, y, tau, rho):
    from megatron.core import parallel_state as ps

    from megatron_tempnet import runtime
    from megatron_tempnet.loss import dro_loss

    runtime.init_distributed(tensor_model_parallel_size=2)
    r = ps.get_tensor_model_parallel_rank()
    shard = z[..., r * PADDED // 2:(r + 1) * PADDED // 2].clone().requires_grad_()
    tau = tau.clone().requires_grad_()
    loss = dro_loss(shard, y, tau, rho, V)
    gz, gt = torch.autograd.grad(loss.sum(), (shard, tau))
    return loss.detach(), gz, gt


@pytest.mark.slow
def test_tensor_parallel_loss_equals_single_device():
    z, y, tau = _inputs(5)
    z, tau = z.detach(), tau.detach()
    results = spawn(_tp2_loss, 2, z, y, tau, 2.0)
    z2, tau2 = z.double().requires_grad_(), tau.double().requires_grad_()
    ref = direct_dro(z2, y, tau2, 2.0, V)
    rz, rt = torch.autograd.grad(ref.sum(), (z2, tau2))
    for loss, _, gt in results:
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gt.double(), rt, rtol=1e-5, atol=1e-6)  # full dL/dtau on every rank
    torch.testing.assert_close(torch.cat([r[1] for r in results], -1).double(), rz, rtol=1e-5, atol=1e-6)
