"""The frozen LM that adaptive decoding reads: logits, TempNet's tau and the last hidden state, at TP = 1.

`LanguageModel.forward(tokens)` runs our TempNetGPTModel without labels (inference.model.forward: logits over
the true vocabulary and TempNet's tau); a forward hook on the model's decoder (megatron-core's TransformerBlock,
whose output has been through the final layernorm) records the last hidden state, the input of the output
layer, which the Adaptive Decoder head reads. Checkpoints load through inference.model at TP = PP = 1 in a
1-rank process group (`ensure_process_group`).

`mixture_lm_config` describes the tiny LM of the built-in task mixture; training/in_process.py trains it
(train_mixture_lm) with the project's trainer.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..config import Config, ConfigError


class AdaptiveError(ConfigError):
    """Bad input to adaptive decoding. The message names the problem and the fix."""


def ensure_process_group(seed: int = 1234) -> None:
    """megatron-core's process groups for this single process (TP = PP = 1), started once
    (inference.model.ensure_single_process_group); refuses a process that already runs another layout."""
    from megatron.core import parallel_state

    from ..inference.model import ensure_single_process_group

    if parallel_state.model_parallel_is_initialized():
        tp = parallel_state.get_tensor_model_parallel_world_size()
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        if tp != 1 or pp != 1:
            raise AdaptiveError(f"adaptive decoding runs at TP = PP = 1; this process has TP={tp} PP={pp}. "
                                "Run it in a single process (python tools/train_adaptive_decoder.py, not torchrun)")
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise AdaptiveError("adaptive decoding runs in one process (TP = 1); launch it with python, not torchrun/srun")
    ensure_single_process_group(seed)


class LanguageModel:
    """A TempNetGPTModel in evaluation mode with its tokenizer; forward gives (logits, tau, hidden)."""

    def __init__(self, model: torch.nn.Module, cfg: Config, tokenizer):
        from ..models.build import unwrap

        self.model = unwrap(model)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.vocab_size = int(self.model.true_vocab_size)
        self.hidden_size = cfg.model.hidden_size
        self.max_length = int(getattr(self.model, "max_sequence_length", None)
                              or cfg.model.max_position_embeddings or cfg.model.seq_length)
        self.has_tempnet = self.model.tempnet is not None
        self._hidden: Optional[torch.Tensor] = None
        self._hook = self.model.decoder.register_forward_hook(self._record)

    def _record(self, _module, _inputs, output):
        self._hidden = output[0] if isinstance(output, tuple) else output

    def take_hidden(self) -> torch.Tensor:
        """The last forward's final hidden states [b, s, H] (fp32); each forward's are taken once."""
        if self._hidden is None:
            raise RuntimeError("no hidden states recorded: run the model's forward first")
        hidden, self._hidden = self._hidden.transpose(0, 1).float(), None
        return hidden

    @property
    def eos(self) -> int:
        return int(self.tokenizer.eod)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor):
        """tokens [b, s] (s <= max_length) -> logits [b, s, V] (true vocabulary, fp32), tau [b, s] or None,
        hidden [b, s, H] (the final layernorm's output, the output layer's input)."""
        from .. import runtime
        from ..inference.model import forward

        if tokens.size(1) > self.max_length:
            raise AdaptiveError(f"a sequence of {tokens.size(1)} tokens exceeds the model's context of "
                                f"{self.max_length} positions; shorten the prompt or lower --max-new-tokens")
        with runtime.native_torch():
            logits, tau = forward(self.model, tokens)
        return logits, tau, self.take_hidden()

    @classmethod
    def from_checkpoint(cls, path: str, tokenizer=None) -> "LanguageModel":
        """Load one of our checkpoints (a save folder or iter_N folder, saved at any TP/PP) at TP = 1
        (inference.model.load_checkpoint_model). `tokenizer`: an object with tokenize/detokenize/eod;
        default: the checkpoint's --tokenizer-model."""
        from ..inference.model import load_checkpoint_model
        from ..checkpoint import read_info, resolve_checkpoint

        saved = read_info(resolve_checkpoint(path))["config"]
        if tokenizer is None:
            tok_path = (saved.get("data") or {}).get("tokenizer_model")
            if not tok_path or not os.path.exists(tok_path):
                raise AdaptiveError(f"{path} names no tokenizer that exists here ({tok_path!r}); pass "
                                    "--tokenizer-model, or --task-mixture for an LM of the built-in mixture")
            from ..data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tok_path)
        ensure_process_group(saved.get("train", {}).get("seed", 1234))
        model, cfg, _ = load_checkpoint_model(path)
        return cls(model, cfg, tokenizer)


# -- a tiny LM of the built-in mixture ---------------------------------------------------------------------


def mixture_lm_config(**overrides) -> Config:
    """A small GPT for the task mixture (no TempNet): 2 layers, hidden 64, contexts of 16 tokens.
    overrides: "section__name" = value (e.g. train__train_iters=300)."""
    from .tasks import MixtureTokenizer

    cfg = Config()
    m, t = cfg.model, cfg.train
    m.arch, m.num_layers, m.hidden_size, m.num_attention_heads = "gpt", 2, 64, 4
    m.seq_length = 16
    m.vocab_size = MixtureTokenizer().vocab_size
    m.make_vocab_size_divisible_by = 8
    m.transformer_impl = "local"
    cfg.data.mock_data = True  # the corpus is synthetic; the trainer's checks need to know there are no files
    t.micro_batch_size = t.global_batch_size = 64
    t.train_iters = 400
    t.lr, t.min_lr, t.lr_warmup_iters = 3e-3, 3e-4, 20
    t.weight_decay = 0.01
    t.eval_interval = 0
    t.precision = "fp32"
    t.seed = 1234
    cfg.logging.log_interval = 10**9
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def check_mixture_model(cfg: Config) -> None:
    """Refuse an LM whose vocabulary is not the mixture's (the built-in tasks need their tokenizer)."""
    from .tasks import MixtureTokenizer

    v = MixtureTokenizer().vocab_size
    if cfg.model.vocab_size != v:
        raise AdaptiveError(f"--task-mixture needs an LM trained on the built-in mixture (vocabulary {v}); this "
                            f"checkpoint's vocabulary is {cfg.model.vocab_size}. Drop --checkpoint to train one, "
                            "or pass --prompts and --reward for your own LM")
