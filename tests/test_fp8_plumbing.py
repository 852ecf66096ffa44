"""FP8 plumbing, checked on a CPU without importing Transformer Engine: which layer spec is chosen, and which
FP8 settings reach megatron-core's TransformerConfig (from which its TE layers build their recipe)."""
import sys

import pytest
import torch

from megatron_tempnet.config import load_config
from megatron_tempnet.finalize import validate
from megatron_tempnet.models import specs
from megatron_tempnet.models.language_model import transformer_config
from megatron_tempnet.models import build as model_setup


def _cfg(*argv):
    cfg, _ = load_config(["--mock-data", "--vocab-size", "1000", *argv])
    return cfg


@pytest.mark.parametrize("impl,te_present,expected", [
    ("auto", False, False), ("auto", True, True), ("local", True, False), ("transformer_engine", True, True),
])
def test_spec_choice(monkeypatch, impl, te_present, expected):
    monkeypatch.setattr(model_setup.runtime, "transformer_engine_available", lambda: te_present)
    assert model_setup.use_transformer_engine(_cfg("--transformer-impl", impl)) is expected


def test_te_spec_is_built_from_megatron_core_te_spec(monkeypatch):
    from megatron.core.models.gpt import gpt_layer_specs

    calls = []
    local = gpt_layer_specs.get_gpt_layer_local_spec()
    monkeypatch.setattr(gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec",
                        lambda **kw: calls.append(kw) or local)
    spec = specs.layer_spec("RMSNorm", use_transformer_engine=True)
    assert calls == [{}] and spec.module is specs.SeededTransformerLayer


@pytest.mark.parametrize("fmt,recipe,history,algo", [("hybrid", "delayed", 1024, "max"), ("e4m3", "tensorwise", 16, "most_recent")])
def test_fp8_settings_reach_transformer_config(fmt, recipe, history, algo):
    cfg = _cfg("--fp8-format", fmt, "--fp8-recipe", recipe, "--fp8-amax-history-len", str(history),
               "--fp8-amax-compute-algo", algo)
    validate(cfg, 1, cuda_available=True, te_available=True)
    tc = transformer_config(cfg, use_cpu_initialization=True, params_dtype=torch.bfloat16, use_transformer_engine=True)
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_amax_history_len, tc.fp8_amax_compute_algo) == (fmt, recipe, history, algo)
    assert tc.bf16 and tc.params_dtype == torch.bfloat16


def test_no_fp8_without_transformer_engine_spec():
    cfg = _cfg("--fp8-format", "hybrid")
    tc = transformer_config(cfg, use_cpu_initialization=True, params_dtype=torch.float32, use_transformer_engine=False)
    assert tc.fp8 is None


def test_unknown_recipe_refused():
    from megatron_tempnet.config import ConfigError

    with pytest.raises(ConfigError, match="--fp8-recipe"):
        validate(_cfg("--fp8-format", "hybrid", "--fp8-recipe", "fast"), 1, cuda_available=True, te_available=True)


def test_transformer_engine_never_imported_on_cpu():
    if not torch.cuda.is_available():
        assert "transformer_engine" not in sys.modules


def _train_te_variants(cfgs):
    """Train each config a few steps on one GPU; per config the losses and the dtypes that FP8 must leave alone."""
    from megatron_tempnet.training.loop import build_datasets, data_iterators, setup_run
    from megatron_tempnet.training.step import train_step

    out = []
    for cfg in cfgs:
        model, optimizer, scheduler = setup_run(cfg)
        iters = data_iterators(cfg, build_datasets(cfg)[0], 0, len(model))
        losses = [train_step(cfg, model, optimizer, scheduler, iters)["loss"] for _ in range(4)]
        lm = model[0].module
        out.append({"losses": losses, "fp8": lm.config.fp8, "recipe": lm.config.fp8_recipe,
                    "tempnet_dtypes": sorted({str(p.dtype) for p in lm.tempnet.parameters()}),
                    "te_layers": sum(type(m).__module__.startswith("megatron.core.extensions.transformer_engine")
                                     for m in lm.modules()),
                    "linear_dtype": str(lm.decoder.layers[0].mlp.linear_fc1.weight.dtype)})
    return out


@pytest.mark.gpu
def test_te_spec_gpt_and_llama_train_in_bf16_and_fp8():
    """GPU + Transformer Engine: the TE-spec GPT and LLaMA train in BF16 and in each FP8 recipe this GPU runs; the
    loss is finite and falls, the LM weights are BF16 and TempNet's stay fp32."""
    pytest.importorskip("transformer_engine")
    from helpers import spawn, tiny_config

    from megatron_tempnet import fp8_support

    cfgs, names = [], []
    for arch in ("gpt", "llama"):
        for recipe in (None, "delayed", "tensorwise", "blockwise"):
            if recipe and fp8_support.recipe_problem(recipe):
                continue
            fp8 = dict(fp8__fp8_format="hybrid", fp8__fp8_recipe=recipe) if recipe else {}
            cfgs.append(tiny_config(arch, model__hidden_size=128, model__num_attention_heads=4, model__seq_length=64,
                                    train__precision="bf16",
                                    loss__loss_impl="fused", model__transformer_impl="transformer_engine",
                                    train__train_iters=4, **fp8))
            names.append((arch, recipe or "bf16"))
    results = spawn(_train_te_variants, 1, cfgs)[0]
    assert ("gpt", "delayed") in names and ("llama", "tensorwise") in names  # any Hopper GPU runs these
    for (arch, recipe), r in zip(names, results):
        losses = torch.tensor(r["losses"])
        assert torch.isfinite(losses).all() and losses[-1] < losses[0], (arch, recipe, r)
        assert r["fp8"] == (None if recipe == "bf16" else "hybrid") and r["te_layers"] > 0, (arch, recipe, r)
        assert r["tempnet_dtypes"] == ["torch.float32"] and r["linear_dtype"] == "torch.bfloat16", (arch, recipe, r)


def _probe(version, capability, supported):
    """A stand-in for Transformer Engine's own checks on a given GPU (fp8_support._te_probe)."""
    reasons = {"blockwise": "FP8 block scaled GEMM requires compute capability 9.0 or higher and CUDA >= 12.9.",
               "mxfp8": "Device compute capability 10.0 or higher required for MXFP8 execution."}
    return lambda: (version, capability, {r: (r in supported, "" if r in supported else reasons.get(r, "no"))
                                          for r in ("delayed", "tensorwise", "blockwise", "mxfp8")})


HOPPER = _probe("2.11.0", (9, 0), {"delayed", "tensorwise", "blockwise"})


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise"])
def test_hopper_recipes_accepted(monkeypatch, recipe):
    from megatron_tempnet import fp8_support

    monkeypatch.setattr(fp8_support, "_te_probe", HOPPER)
    validate(_cfg("--fp8-format", "e4m3", "--fp8-recipe", recipe), 1, cuda_available=True, te_available=True)


def test_mxfp8_on_hopper_refused_with_the_recipes_that_run(monkeypatch):
    from megatron_tempnet import fp8_support
    from megatron_tempnet.config import ConfigError

    monkeypatch.setattr(fp8_support, "_te_probe", HOPPER)
    with pytest.raises(ConfigError) as err:
        validate(_cfg("--fp8-format", "hybrid", "--fp8-recipe", "mxfp8"), 1, cuda_available=True, te_available=True)
    msg = str(err.value)
    assert "--fp8-recipe mxfp8 cannot run on this GPU (compute capability 9.0, Transformer Engine 2.11.0)" in msg
    assert "10.0 or higher" in msg and msg.endswith("use --fp8-recipe delayed or tensorwise or blockwise")
    assert "\n" not in msg


def test_blockwise_on_ada_refused(monkeypatch):
    from megatron_tempnet import fp8_support
    from megatron_tempnet.config import ConfigError

    monkeypatch.setattr(fp8_support, "_te_probe", _probe("2.11.0", (8, 9), {"delayed", "tensorwise"}))
    with pytest.raises(ConfigError, match=r"blockwise cannot run .* 8\.9.* use --fp8-recipe delayed or tensorwise$"):
        validate(_cfg("--fp8-format", "hybrid", "--fp8-recipe", "blockwise"), 1, cuda_available=True, te_available=True)


@pytest.mark.parametrize("version", ["2.8.0", "2.12.0", "2.20.2"])
def test_transformer_engine_outside_megatron_core_range_refused(monkeypatch, version):
    from megatron_tempnet import fp8_support
    from megatron_tempnet.config import ConfigError

    monkeypatch.setattr(fp8_support, "_te_probe", _probe(version, (9, 0), {"delayed"}))
    with pytest.raises(ConfigError, match=f"Transformer Engine {version} is installed but megatron-core 0.16.1 supports"):
        validate(_cfg("--fp8-format", "hybrid"), 1, cuda_available=True, te_available=True)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_fp8_needs_bf16_weights(precision):
    from megatron_tempnet.config import ConfigError

    with pytest.raises(ConfigError, match=f"use --precision bf16 .*not {precision}"):
        validate(_cfg("--fp8-format", "hybrid", "--precision", precision), 1, cuda_available=True, te_available=True)


def test_fp8_dimensions_not_divisible_by_16_refused():
    from megatron_tempnet.config import ConfigError

    with pytest.raises(ConfigError, match=r"divisible by 16; --hidden-size 72 is not"):
        validate(_cfg("--fp8-format", "hybrid", "--hidden-size", "72", "--num-attention-heads", "4",
                      "--ffn-hidden-size", "256"), 1, cuda_available=True, te_available=True)
    with pytest.raises(ConfigError, match=r"tokens per micro-batch and rank .* 20 is not"):
        validate(_cfg("--fp8-format", "hybrid", "--seq-length", "10", "--micro-batch-size", "2",
                      "--global-batch-size", "8"), 1, cuda_available=True, te_available=True)


def test_recipe_probe_without_transformer_engine_tells_nothing_and_imports_nothing():
    from megatron_tempnet import fp8_support

    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert fp8_support.recipe_problem("mxfp8") is None and "transformer_engine" not in sys.modules
