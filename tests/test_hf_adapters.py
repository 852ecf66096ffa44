"""Each family's Hugging Face adapter, without megatron or a process group: a transformers model made from the
adapter's config, converted to our state dict and back, gives the same tensors (tied and untied embeddings),
and the config read back from it describes the same model (a tied LLaMA comes back untied: the import gives
our LLaMA the embedding as its output layer too)."""
import dataclasses

import pytest
import torch

from megatron_tempnet.config import ModelConfig
from megatron_tempnet.models.registry import FAMILIES, model_dims

CONVERTIBLE = [name for name, family in FAMILIES.items() if family.hf is not None]


def _model_config(arch: str, untie) -> ModelConfig:
    return ModelConfig(arch=arch, num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                       seq_length=16, vocab_size=250, transformer_impl="local",
                       untie_embeddings_and_output_weights=untie)


@pytest.mark.parametrize("untie", [False, True])
@pytest.mark.parametrize("arch", CONVERTIBLE)
def test_hf_to_ours_to_hf_is_identical(arch, untie):
    import transformers

    m = _model_config(arch, untie)
    if arch == "gpt":
        m.num_query_groups = None  # GPT-2 has one key/value head per query head
    adapter = FAMILIES[arch].hf(m)
    hcfg = transformers.AutoConfig.for_model(adapter.model_type, **adapter.to_hf_config({}))
    assert hcfg.tie_word_embeddings == (not untie)
    torch.manual_seed(0)
    hf_model = getattr(transformers, adapter.architecture)(hcfg)
    for p in hf_model.parameters():  # (biases and norms start at constants: make every tensor tell)
        torch.nn.init.normal_(p)
    hf = {k: v for k, v in hf_model.state_dict().items()}
    ours = adapter.from_hf(hf, tie_word_embeddings=not untie)
    assert ours["embedding.word_embeddings.weight"].shape[0] == model_dims(m).padded_vocab_size
    assert ("output_layer.weight" in ours) == untie
    back = adapter.to_hf(ours)
    missing, unexpected = hf_model.load_state_dict(back, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if not untie else set())
    for key, value in back.items():
        assert torch.equal(value, hf[key]), key
    read = model_dims(type(adapter).from_hf_config(hcfg.to_dict(), "the folder"))
    assert dataclasses.replace(read, tied_embeddings=model_dims(m).tied_embeddings) == model_dims(m)
    assert read.tied_embeddings == (model_dims(m).tied_embeddings and arch != "llama")
