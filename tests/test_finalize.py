"""finalize: a resolved copy of the run (the caller's Config unchanged), the tokenizer loaded once."""
import copy

import pytest

from megatron_tempnet.config import ConfigError, load_config
from megatron_tempnet.finalize import finalize, resolve

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "4"]


class _Tokenizer:
    vocab_size = 250


@pytest.fixture
def loads(monkeypatch):
    """The paths load_tokenizer was called with (it returns a 250-id tokenizer)."""
    from megatron_tempnet.data import tokenizer

    calls = []
    monkeypatch.setattr(tokenizer, "load_tokenizer", lambda path: calls.append(path) or _Tokenizer())
    return calls


def test_vocabulary_comes_from_the_tokenizer_loaded_once_into_a_copy(loads):
    cfg, _ = load_config([*TINY, "--data-path", "corpus", "--tokenizer-model", "tok.model"])
    before = copy.deepcopy(cfg)
    run = finalize(cfg, 1, cuda_available=False, te_available=False)
    assert run.cfg.model.vocab_size == 250 and run.dims.padded_vocab_size == 256 and isinstance(run.tokenizer, _Tokenizer)
    assert cfg == before  # the caller's configuration is not edited
    again = resolve(run.cfg, tokenizer=run.tokenizer)  # what train() does with it
    assert again.cfg == run.cfg and loads == ["tok.model"]


def test_a_vocabulary_that_differs_from_the_tokenizers_is_refused(loads):
    cfg, _ = load_config([*TINY, "--data-path", "corpus", "--tokenizer-model", "tok.model", "--vocab-size", "300"])
    with pytest.raises(ConfigError, match=r"vocabulary \(300, --vocab-size\) differs from the tokenizer's \(250"):
        finalize(cfg, 1, cuda_available=False, te_available=False)


def test_16_bit_tempnet_takes_the_distributed_optimizer_in_the_copy_only():
    cfg, _ = load_config([*TINY, "--mock-data", "--vocab-size", "250", "--precision", "bf16", "--tempnet-enabled",
                          "--dro-target-entropy", "3.0"])
    run = finalize(cfg, 1, cuda_available=True, te_available=False)
    assert run.cfg.parallel.use_distributed_optimizer and not cfg.parallel.use_distributed_optimizer
    fp32 = finalize(load_config([*TINY, "--mock-data", "--vocab-size", "250", "--tempnet-enabled",
                                 "--dro-target-entropy", "3.0"])[0], 1, cuda_available=False, te_available=False)
    assert not fp32.cfg.parallel.use_distributed_optimizer
