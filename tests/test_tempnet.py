"""TempNet against the formula in docs/design.md, its bounds, its TP sharding, and the frozen-LM setting."""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import spawn, tiny_config

V, PADDED, D = 50, 64, 16


def make_tempnet(variant="normalized", tau_min=0.5, tau_max=5.0, seed=3, scale_input=False, tau_init=None):
    """tau_init None: the reference's initialisation (a = 1), whose every tensor is on the gradient's path."""
    from megatron_tempnet.config import TempNetConfig
    from megatron_tempnet.models.tempnet import TempNet

    cfg = TempNetConfig(enabled=True, hidden_size=D, tau_min=tau_min, tau_max=tau_max, input_variant=variant,
                        scale_input=scale_input, tau_init=tau_init)
    net = TempNet(cfg, V, PADDED, seed=seed)
    if scale_input:
        with torch.no_grad():  # u starts at 0; give the scale term a value to test
            net.scale_weight.copy_(torch.randn(D, generator=torch.Generator().manual_seed(seed)))
    return net


def formula(net, z):
    """docs/design.md, written out: x = z/||z|| (z over the true vocabulary; max-shifted first if asked);
    h = W2 sigmoid(W1 x + b1) + b2; w = softmax(h / e^s); tau = lo + (hi-lo) sigmoid(a.((w - 1/d) h) + c)."""
    z = z[..., :V].double()
    if net.input_variant == "max_shifted":
        z = z - z.max(-1, keepdim=True).values
    x = z / z.norm(dim=-1, keepdim=True)
    W1, b1 = net.w1.double()[:, :V], net.b1.double()
    W2, b2 = net.proj.weight.double(), net.proj.bias.double()
    a, c, s = net.last.weight.double().squeeze(0), net.last.bias.double(), net.log_scale.double()
    pre = x @ W1.T + b1
    if net.scale_weight is not None:  # + u log RMS(z)
        pre = pre + torch.log(z.norm(dim=-1, keepdim=True) / math.sqrt(V)) * net.scale_weight.double()
    h = torch.sigmoid(pre) @ W2.T + b2
    w = torch.softmax(h / s.exp(), -1)
    return net.tau_min + (net.tau_max - net.tau_min) * torch.sigmoid(((w - 1 / D) * h) @ a + c)


@pytest.mark.parametrize("variant,scale_input", [("normalized", False), ("max_shifted", False), ("normalized", True)])
def test_matches_formula(single_rank, variant, scale_input):
    net = make_tempnet(variant, scale_input=scale_input)
    with torch.no_grad():  # move away from the initial a = 1, c = 0, s = 0 so every term matters
        net.last.weight.normal_()
        net.last.bias.fill_(0.3)
        net.log_scale.fill_(0.2)
    z = torch.randn(5, 3, PADDED) * 4
    torch.testing.assert_close(net(z).double(), formula(net, z), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant,scale_input", [("normalized", False), ("max_shifted", False), ("max_shifted", True)])
def test_logits_free_input_equals_logits_input(single_rank, variant, scale_input):
    net = make_tempnet(variant, scale_input=scale_input)
    hidden = torch.randn(7, 12)
    weight = torch.randn(PADDED, 12)
    z = hidden @ weight.T
    zmax = z[:, :V].max(-1).values
    torch.testing.assert_close(net.forward_from_hidden(hidden, weight, logit_max=zmax), net(z), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tau_init", [0.02, 1.0, 1.99])
def test_tau_init_sets_every_tokens_initial_tau(single_rank, tau_init):
    from megatron_tempnet.config import TempNetConfig
    from megatron_tempnet.models.tempnet import GlobalTemperature

    net = make_tempnet(tau_min=0.01, tau_max=2.0, tau_init=tau_init)
    tau = net(torch.randn(64, PADDED) * torch.rand(64, 1) * 10)
    assert torch.allclose(tau.double(), torch.full((64,), tau_init, dtype=torch.float64), atol=1e-6, rtol=0)
    glob = GlobalTemperature(TempNetConfig(enabled=True, tau_min=0.01, tau_max=2.0, tau_init=tau_init))
    assert float(glob(torch.randn(3, PADDED))[0]) == pytest.approx(tau_init, abs=1e-6)


def test_tau_init_trains_off_its_start(single_rank):
    """The last layer starts at zero weight: the first steps move it, and then tau varies between tokens."""
    net = make_tempnet(tau_min=0.01, tau_max=2.0, tau_init=1.0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    z = torch.randn(256, PADDED) * torch.linspace(0.5, 8, 256).unsqueeze(-1)
    target = torch.linspace(0.2, 1.8, 256)
    for _ in range(30):
        loss = (net(z) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(net(z).std()) > 0.05 and float(loss) < 0.3


def test_scale_input_sees_the_logit_scale(single_rank):
    """z / ||z|| alone is blind to scale: TempNet(3 z) = TempNet(z); the scale term is not."""
    z = torch.randn(8, PADDED)
    plain, scaled = make_tempnet(), make_tempnet(scale_input=True)
    torch.testing.assert_close(plain(3 * z), plain(z), rtol=1e-6, atol=1e-6)
    assert (scaled(3 * z) - scaled(z)).abs().max() > 1e-4


def test_tau_stays_in_bounds(single_rank):
    net = make_tempnet(tau_min=0.01, tau_max=2.0)
    with torch.no_grad():
        net.last.weight.fill_(100.0)
    for scale in (1e-3, 1.0, 1e3):
        tau = net(torch.randn(64, PADDED) * scale)
        assert torch.all(tau >= 0.01) and torch.all(tau <= 2.0)


def test_no_gradient_reaches_lm_through_tempnet_input(single_rank):
    from megatron_tempnet.models.build import build_model_chunks

    cfg = tiny_config("llama", tempnet__tau_init=None)  # the reference's init: every TempNet tensor gets a gradient
    (model,) = build_model_chunks(cfg)
    hidden = torch.randn(cfg.model.seq_length, 2, cfg.model.hidden_size, requires_grad=True)
    logits, tau = model.logits_and_tau(hidden)
    tau.sum().backward()
    assert hidden.grad is None or torch.count_nonzero(hidden.grad) == 0
    for name, p in model.named_parameters():
        if getattr(p, "is_tempnet_parameter", False):
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        else:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name


def _frozen_lm_run(cfg):
    from megatron_tempnet.training.loop import build_datasets, data_iterators, setup_run
    from megatron_tempnet.models.build import unwrap
    from megatron_tempnet.training.step import train_step

    model, optimizer, scheduler = setup_run(cfg)
    before = {n: p.detach().clone() for n, p in unwrap(model[0]).named_parameters()}
    iters = data_iterators(cfg, build_datasets(cfg)[0], 0, len(model))
    for _ in range(2):
        train_step(cfg, model, optimizer, scheduler, iters)
    after = dict(unwrap(model[0]).named_parameters())
    return {n: (getattr(after[n], "is_tempnet_parameter", False), bool(torch.equal(before[n], after[n].detach())))
            for n in before}


@pytest.mark.slow
def test_frozen_lm_mode_trains_tempnet_only():
    cfg = tiny_config("gpt", train__mode="frozen_lm", tempnet__tau_init=None)  # every TempNet tensor moves at once
    changed = spawn(_frozen_lm_run, 1, cfg)[0]
    for name, (is_tempnet, unchanged) in changed.items():
        assert unchanged != is_tempnet, f"{name}: tempnet={is_tempnet} unchanged={unchanged}"


def _tp2_tempnet(z, variant, scale_input):
    from megatron.core import parallel_state as ps

    from megatron_tempnet import runtime

    runtime.init_distributed(tensor_model_parallel_size=2)
    net = make_tempnet(variant, scale_input=scale_input)
    r = ps.get_tensor_model_parallel_rank()
    tau = net(z[..., r * PADDED // 2:(r + 1) * PADDED // 2])
    tau.sum().backward()
    return tau.detach(), net.w1.grad, net.proj.weight.grad


@pytest.mark.slow
@pytest.mark.parametrize("variant,scale_input", [("normalized", False), ("max_shifted", False), ("normalized", True)])
def test_tensor_parallel_tempnet_equals_single_rank(single_rank, variant, scale_input):
    z = torch.randn(6, PADDED) * 3
    net = make_tempnet(variant, scale_input=scale_input)
    tau = net(z)
    tau.sum().backward()
    results = spawn(_tp2_tempnet, 2, z, variant, scale_input)
    for t, _, gproj in results:
        torch.testing.assert_close(t, tau.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gproj, net.proj.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r[1] for r in results], 1), net.w1.grad, rtol=1e-5, atol=1e-6)


def test_shipped_recipe_learns_the_per_token_optimum(single_rank):
    """The short version of benchmarks/tempnet_recipe.py's frozen-LM check: TempNet with the config's defaults
    (tau_init, lr, constant schedule) on fixed logits whose per-token DRO optimum tau* varies. Its tau starts
    identical for every token and must spread out along tau*, far beyond the reference initialisation's ~1e-5."""
    from megatron_tempnet.config import TempNetConfig
    from megatron_tempnet.loss import dro_loss
    from megatron_tempnet.models import tempnet_diagnostics as diag
    from megatron_tempnet.models.tempnet import TempNet

    vocab, n = 256, 1024
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, vocab, generator=gen)  # sharpness varies by token: a peak of random height on a frequent token
    z[torch.arange(n), torch.randint(0, 8, (n,), generator=gen)] += torch.rand(n, generator=gen) * 10
    y = torch.randint(0, vocab, (n,), generator=gen)
    cfg = TempNetConfig(enabled=True, hidden_size=64, tau_min=0.01, tau_max=2.0)
    target = float(diag.tempered_entropy(z, torch.ones(n), vocab).mean())  # the LM's own mean entropy
    tau_opt = diag.optimal_tau(z, target, cfg.tau_min, cfg.tau_max, vocab)
    net = TempNet(cfg, vocab, vocab, seed=1)
    assert float(net(z).std()) < 1e-6
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    for _ in range(150):
        loss = dro_loss(z, y, net(z), math.log(vocab) - target, vocab).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        stats = diag.summarize(net(z), tau_opt, None, None, cfg.tau_min, cfg.tau_max)
    assert stats["tau_std"] > 0.1 and stats["spearman_tau_opt"] > 0.8, stats
    assert stats["frac_at_min"] + stats["frac_at_max"] < 0.2, stats


@pytest.mark.parametrize("schedule", ["constant", "lm"])
def test_tempnet_lr_schedule(single_rank, schedule):
    """constant: TempNet's lr holds at --tempnet-lr after the shared warm-up while the LM's decays; lm: both decay."""
    from megatron_tempnet.training.model_setup import build_ddp_model_chunks as build_model_chunks
    from megatron_tempnet.training.optim import build_optimizer, build_scheduler

    cfg = tiny_config("gpt", tempnet__lr_schedule=schedule, tempnet__lr=3e-3, tempnet__min_lr=3e-4, train__lr=1e-2,
                      train__min_lr=1e-3, train__lr_warmup_iters=2, train__train_iters=10)
    model = build_model_chunks(cfg)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    for _ in range(10):
        scheduler.step(increment=cfg.train.global_batch_size)
    lrs = {bool(g.get("max_lr") == 3e-3): g["lr"] for g in optimizer.param_groups}
    assert lrs[False] == pytest.approx(1e-3)  # the LM at its min_lr
    assert lrs[True] == pytest.approx(3e-3 if schedule == "constant" else 3e-4)
