"""The per-token DRO optimum tau*, the tempered entropy and the rank statistics, against brute force."""
import math

import pytest
import torch

from helpers import spawn

from megatron_tempnet.models import tempnet_diagnostics as diag

V = 37  # a shard boundary that is not a multiple of anything


def entropy_direct(z: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(z.double() / tau.double().unsqueeze(-1), -1)
    return -(p * p.clamp_min(1e-300).log()).sum(-1)


def test_tempered_entropy_equals_direct_formula():
    z = torch.randn(9, V) * 3
    tau = torch.rand(9) * 2 + 0.1
    torch.testing.assert_close(diag.tempered_entropy(z, tau, V).double(), entropy_direct(z, tau), rtol=1e-5, atol=1e-5)


def test_padding_is_left_out():
    z = torch.randn(4, V + 11) * 2
    z[:, V:] = 100.0  # padded entries must not take any probability mass
    tau = torch.ones(4)
    torch.testing.assert_close(diag.tempered_entropy(z, tau, V).double(), entropy_direct(z[:, :V], tau),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", [0.5, 1.5, 3.0])
def test_optimal_tau_equals_brute_force_search(target):
    """tau* minimises the DRO loss per token: a fine grid over [tau_min, tau_max] finds the same minimiser."""
    torch.manual_seed(0)
    z = torch.randn(12, V) * torch.linspace(0.3, 6, 12).unsqueeze(-1)
    y = torch.randint(0, V, (12,))
    tau_min, tau_max = 0.05, 5.0
    rho = math.log(V) - target
    grid = torch.exp(torch.linspace(math.log(tau_min), math.log(tau_max), 20001, dtype=torch.float64))
    zt = z.double().unsqueeze(1) / grid.view(1, -1, 1)  # [n, grid, V]
    ce = torch.logsumexp(zt, -1) - zt.gather(-1, y.view(-1, 1, 1).expand(-1, grid.numel(), 1)).squeeze(-1)
    loss = grid * ce + grid * (rho - math.log(V))  # the DRO loss of each token at each grid temperature
    brute = grid[loss.argmin(1)]
    got = diag.optimal_tau(z, target, tau_min, tau_max, V).double()
    torch.testing.assert_close(got, brute, rtol=2e-3, atol=0)


def test_optimal_tau_is_clipped_to_the_bounds():
    z = torch.zeros(2, V)
    z[1] = torch.arange(V).float() * 50  # nearly one-hot: even tau_max cannot reach the target
    got = diag.optimal_tau(z, 1.0, 0.1, 2.0, V)  # uniform logits: entropy log V > target at every tau
    assert got[0] == pytest.approx(0.1, rel=1e-6) and got[1] == pytest.approx(2.0, rel=1e-6)


def test_optimal_tau_scales_with_the_logits():
    """tau*(k z) = k tau*(z): why TempNet's normalised input cannot follow it."""
    z = torch.randn(6, V)
    t1 = diag.optimal_tau(z, 2.0, 1e-3, 1e3, V)
    t3 = diag.optimal_tau(3 * z, 2.0, 1e-3, 1e3, V)
    torch.testing.assert_close(t3, 3 * t1, rtol=1e-5, atol=0)


def test_spearman_with_ties_equals_pearson_of_average_ranks():
    x = torch.tensor([1.0, 2.0, 2.0, 3.0, 5.0, 4.0])
    y = torch.tensor([2.0, 1.0, 4.0, 3.0, 6.0, 6.0])
    rx = torch.tensor([1, 2.5, 2.5, 4, 6, 5], dtype=torch.float64)
    ry = torch.tensor([2, 1, 4, 3, 5.5, 5.5], dtype=torch.float64)
    expected = float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])
    assert diag.spearman(x, y) == pytest.approx(expected, abs=1e-12)
    assert diag.spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(diag.spearman(torch.ones(4), x[:4]))


def test_summarize_percentiles_and_bound_fractions():
    tau = torch.cat([torch.full((10,), 0.5), torch.linspace(1.0, 4.0, 80), torch.full((10,), 5.0)])
    s = diag.summarize(tau, tau, -tau, torch.ones(100), tau_min=0.5, tau_max=5.0)
    assert s["frac_at_min"] == pytest.approx(0.10) and s["frac_at_max"] == pytest.approx(0.10)
    assert s["tau_p50"] == pytest.approx(float(tau.double().median()), abs=0.05)
    assert s["spearman_tau_opt"] == pytest.approx(1.0) and s["spearman_tau_entropy"] == pytest.approx(-1.0)
    assert s["tau_std"] == pytest.approx(float(tau.double().std(unbiased=False)))


def _tp2(z, tau, target):
    from megatron.core import parallel_state as ps

    from megatron_tempnet import runtime

    runtime.init_distributed(tensor_model_parallel_size=2)
    r, shard = ps.get_tensor_model_parallel_rank(), z.size(-1) // 2
    group = ps.get_tensor_model_parallel_group()
    part = z[:, r * shard:(r + 1) * shard]
    return (diag.tempered_entropy(part, tau, V, r * shard, group), diag.optimal_tau(part, target, 0.1, 4.0, V, r * shard, group),
            diag.logit_scale(part, V, r * shard, group))


@pytest.mark.slow
def test_vocabulary_parallel_equals_one_rank():
    z = torch.randn(5, 48) * 2  # V = 37 of a padded 48: rank 1's shard is part padding
    tau = torch.rand(5) + 0.5
    results = spawn(_tp2, 2, z, tau, 2.0)
    expected = (diag.tempered_entropy(z, tau, V), diag.optimal_tau(z, 2.0, 0.1, 4.0, V), diag.logit_scale(z, V))
    for got in results:
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(expected[2].double(), z[:, :V].double().std(-1, unbiased=False), rtol=1e-5, atol=1e-6)
