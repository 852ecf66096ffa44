"""Model families: the registry, the sizes each family derives, and a parameter count that equals the model's."""
import pytest

from helpers import tiny_config
from megatron_tempnet.config import Config, ConfigError
from megatron_tempnet.models.registry import FAMILIES, get_family, model_dims

# (arch, untie) -> tied embeddings: each family's default, and the flag both ways
TYING = [("gpt", None, True), ("gpt", True, False), ("llama", None, False), ("llama", False, True)]


def test_unknown_family_names_the_registered_ones():
    with pytest.raises(ConfigError, match=f"--arch must be one of {', '.join(FAMILIES)}; got 'gtp'"):
        get_family("gtp")
    assert {"gpt", "llama"} <= set(FAMILIES) and all(name == f.name for name, f in FAMILIES.items())


def test_dims_follow_the_family_and_the_flags():
    cfg = Config()
    cfg.model.vocab_size, cfg.model.hidden_size = 250, 96
    dims = model_dims(cfg.model)
    assert (dims.padded_vocab_size, dims.ffn_hidden_size, dims.position_embeddings) == (256, 384, cfg.model.seq_length)
    cfg.model.arch = "llama"
    dims = model_dims(cfg.model)
    assert (dims.ffn_hidden_size, dims.position_embeddings, dims.tied_embeddings) == (256, None, False)  # 8/3 x 96
    cfg.model.ffn_hidden_size, cfg.model.vocab_size = 100, None
    assert (model_dims(cfg.model).ffn_hidden_size, model_dims(cfg.model).padded_vocab_size) == (100, None)


@pytest.mark.parametrize("arch,untie,tied", TYING)
def test_parameter_count_equals_the_built_model(single_rank, arch, untie, tied):
    """The count a job's preflight prints is the number of parameters the model has (TempNet included)."""
    from megatron_tempnet.models.build import build_model_chunks
    from megatron_tempnet.training.preflight import parameter_count

    cfg = tiny_config(arch, model__untie_embeddings_and_output_weights=untie, tempnet__scale_input=arch == "llama")
    (model,) = build_model_chunks(cfg)
    assert model.dims.tied_embeddings is tied and model.share_embeddings_and_output_weights is tied
    assert parameter_count(cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch,figures", [
    ("gpt", [(250, 252418, 786432), (50257, 16267778, 20004864)]),
    ("llama", [(250, 263234, 786432), (50257, 19481666, 20004864)]),
])
def test_sizes_printed_are_those_of_the_formulas_before_families(arch, figures):
    """Parameter count and FLOPs per token of the default model with TempNet, as the per-file formulas of
    training/preflight.py and training/tracker.py gave them (the printed figures do not change)."""
    from megatron_tempnet.training.preflight import parameter_count

    for vocab, params, flops in figures:
        cfg = Config()
        cfg.model.arch, cfg.model.vocab_size, cfg.tempnet.enabled = arch, vocab, True
        cfg.model.num_query_groups = 2 if arch == "llama" else None
        assert parameter_count(cfg) == params
        assert get_family(arch).flops_per_token(model_dims(cfg.model)) == flops
