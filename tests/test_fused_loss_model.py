"""--loss-impl fused equals reference inside the model: loss, every gradient (LM and TempNet), at TP=1
and TP=2, and the same loss curve over 50 training steps."""
import pytest
import torch

from helpers import spawn, tiny_config


def _loss_and_grads(cfg):
    from megatron_tempnet.training.batches import MockTokens, collate
    from megatron_tempnet.training.loop import setup_run
    from megatron_tempnet.models.build import unwrap

    model, _, _ = setup_run(cfg)
    lm = unwrap(model[0])
    ds = MockTokens(cfg.model.vocab_size, cfg.model.seq_length, 8, seed=0)
    batch = collate([ds[i] for i in range(4)], torch.device("cpu"))
    out = lm(batch.input_ids, batch.position_ids, batch.attention_mask, labels=batch.labels)
    out.loss.sum().backward()
    # megatron-core DDP accumulates gradients in main_grad buffers
    grads = {n: p.main_grad.clone() for n, p in lm.named_parameters() if p.requires_grad}
    return out.loss.detach(), out.tau.detach(), grads


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("variant", ["normalized", "max_shifted"])
def test_fused_equals_reference_in_value_and_gradient(tp, variant):
    results = {}
    for impl in ("reference", "fused"):
        cfg = tiny_config("llama", loss__loss_impl=impl, parallel__tensor_model_parallel_size=tp,
                          tempnet__input_variant=variant)
        results[impl] = spawn(_loss_and_grads, tp, cfg)
    for rank in range(tp):
        (ref_loss, ref_tau, ref_g), (loss, tau, g) = results["reference"][rank], results["fused"][rank]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tau, ref_tau, rtol=1e-5, atol=1e-6)
        assert set(g) == set(ref_g)
        assert any("tempnet" in n for n in g)
        for name in ref_g:
            scale = ref_g[name].abs().max().clamp_min(1e-12)
            err = (g[name] - ref_g[name]).abs().max() / scale
            assert err < 1e-5, f"{name}: relative error {err:.2e}"


def _curve(cfg):
    from megatron_tempnet.training.loop import train

    return [h["loss"] for h in train(cfg).history if "loss" in h]


@pytest.mark.slow
def test_fused_training_curve_equals_reference_over_50_steps():
    curves = {impl: spawn(_curve, 1, tiny_config("gpt", loss__loss_impl=impl, train__train_iters=50))[0]
              for impl in ("reference", "fused")}
    torch.testing.assert_close(torch.tensor(curves["fused"]), torch.tensor(curves["reference"]), rtol=1e-5, atol=1e-5)
    assert curves["fused"][-1] < curves["fused"][0]


def _two_micro_batches(cfg, shared, backward_passes=2):
    """Forward + backward of two different micro-batches, with TempNet's classifier statistics and W1 gradient
    computed per micro-batch or once for both (as train_step does); returns the losses and accumulated
    gradients."""
    import contextlib

    from megatron_tempnet.models.tempnet import shared_across_micro_batches
    from megatron_tempnet.training.batches import MockTokens, collate
    from megatron_tempnet.training.loop import setup_run
    from megatron_tempnet.models.build import unwrap

    model, _, _ = setup_run(cfg)
    lm = unwrap(model[0])
    ds = MockTokens(cfg.model.vocab_size, cfg.model.seq_length, 8, seed=0)
    losses = []
    with shared_across_micro_batches([lm.tempnet], backward_passes) if shared else contextlib.nullcontext():
        for i in (0, 4):
            batch = collate([ds[j] for j in range(i, i + 4)], torch.device("cpu"))
            out = lm(batch.input_ids, batch.position_ids, batch.attention_mask, labels=batch.labels)
            out.loss.sum().backward()
            losses.append(out.loss.detach())
        cached = lm.tempnet._step_cache is not None and "stats" in lm.tempnet._step_cache
    assert lm.tempnet._step_cache is None  # off again outside
    grads = {n: p.main_grad.clone() for n, p in lm.named_parameters() if p.requires_grad}
    return losses, grads, cached


@pytest.mark.parametrize("variant", ["normalized", "max_shifted"])
def test_work_shared_across_micro_batches_gives_the_same_gradients(variant):
    """Statistics reused: bitwise the same; W1's gradient formed once: the same sum in another order."""
    cfg = tiny_config("llama", loss__loss_impl="fused", parallel__tensor_model_parallel_size=2,
                      tempnet__input_variant=variant)
    fresh = spawn(_two_micro_batches, 2, cfg, False)
    shared = spawn(_two_micro_batches, 2, cfg, True)
    for (l0, g0, c0), (l1, g1, c1) in zip(fresh, shared):
        assert not c0 and c1
        for a, b in zip(l0, l1):
            assert torch.equal(a, b)
        for name in g0:
            if name.endswith("tempnet.w1"):
                torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7)
                assert g1[name].abs().sum() > 0
            else:
                assert torch.equal(g0[name], g1[name]), name


def test_w1_gradient_missing_a_backward_pass_is_an_error():
    cfg = tiny_config("llama", loss__loss_impl="fused")
    with pytest.raises(RuntimeError, match="W1 gradient was never formed: the step was set up for 3"):
        spawn(_two_micro_batches, 1, cfg, True, 3)
