"""FP8 plumbing, checked on a CPU without importing Transformer Engine: which layer spec is chosen, and which
FP8 settings reach megatron-core's TransformerConfig (from which its TE layers build their recipe)."""
import sys

import pytest
import torch

from megatron_tempnet.config import load_config, validate
from megatron_tempnet.models import specs
from megatron_tempnet.models.language_model import transformer_config
from megatron_tempnet.training import model_setup


def _cfg(*argv):
    cfg, _ = load_config(["--mock-data", "--vocab-size", "1000", *argv])
    return cfg


@pytest.mark.parametrize("impl,te_present,expected", [
    ("auto", False, False), ("auto", True, True), ("local", True, False), ("transformer_engine", True, True),
])
def test_spec_choice(monkeypatch, impl, te_present, expected):
    monkeypatch.setattr(model_setup.platform, "transformer_engine_available", lambda: te_present)
    assert model_setup.use_transformer_engine(_cfg("--transformer-impl", impl)) is expected


def test_te_spec_is_built_from_megatron_core_te_spec(monkeypatch):
    from megatron.core.models.gpt import gpt_layer_specs

    calls = []
    local = gpt_layer_specs.get_gpt_layer_local_spec()
    monkeypatch.setattr(gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec",
                        lambda **kw: calls.append(kw) or local)
    spec = specs.layer_spec("llama", use_transformer_engine=True)
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


@pytest.mark.gpu
def test_fp8_trains_on_gpu(tmp_path):
    """GPU + Transformer Engine: a few FP8 steps of a small GPT run and the loss is finite and falls."""
    pytest.importorskip("transformer_engine")
    from helpers import spawn, tiny_config

    from test_parallel_equivalence import _train_steps

    cfg = tiny_config("gpt", fp8__fp8_format="hybrid", model__hidden_size=128, model__num_attention_heads=4,
                      train__precision="bf16", loss__loss_impl="fused")
    losses = spawn(_train_steps, 1, cfg)[0]["losses"]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
