"""Sampling with a temperature per generated token: fixed, TempNet's, or chosen by the Adaptive Decoder head.

The loop is the project's (inference.generation.generate: stop tokens, top-k / top-p, seeded sampling). It
divides each step's logits by the backend's per-row "tau"; `TemperatureBackend` is our model's backend
(inference.generation.MegatronBackend: the full prefix re-run each step, right-padded batches) whose tau is
the temperature of this module's choice, and which records, for LPO, the index of each latent choice and the
hidden state it was made from (the model's decoder output at the row's last position, through a forward
hook). Temperature 0 is greedy decoding (a temperature of 1e-6 to the loop, which is the argmax).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import torch

from ..inference.generation import MegatronBackend, SamplingParams
from ..inference.generation import generate as generate_tokens
from .head import AdaptiveDecoderHead
from .lm import AdaptiveError, LanguageModel

GREEDY_TAU = 1e-6  # what temperature 0 becomes in the loop's z / tau: a one-hot softmax at the argmax


@dataclass
class Response:
    prompt: List[int]
    tokens: List[int]  # generated tokens, up to and including <eos> when it came
    temperatures: List[float]  # one per generated token
    choices: List[int] = field(default_factory=list)  # latent choices: one per token (token mode) or one (sequence)
    hidden: Optional[torch.Tensor] = None  # [len(choices), H] hidden states the choices were made from


def check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, context: int,
                  texts: Optional[Sequence[str]] = None) -> None:
    """Refuse empty prompts and prompts that leave no room for max_new_tokens in the context."""
    if max_new_tokens < 1:
        raise AdaptiveError(f"--max-new-tokens must be >= 1; got {max_new_tokens}")
    if len(prompts) == 0:
        raise AdaptiveError("there are no prompts; pass a prompt file with one prompt per line (or --task-mixture)")
    for i, p in enumerate(prompts):
        shown = repr(texts[i][:60]) if texts is not None else f"#{i}"
        if len(p) == 0:
            raise AdaptiveError(f"prompt {i} ({shown}) is empty (no tokens); remove empty lines from the prompt file "
                                "or give every prompt some text")
        if len(p) + max_new_tokens > context:
            room = context - max_new_tokens
            raise AdaptiveError(
                f"prompt {i} ({shown}) has {len(p)} tokens; with --max-new-tokens {max_new_tokens} it needs "
                f"{len(p) + max_new_tokens} positions but the model's context is {context}. Shorten the prompt to at "
                f"most {max(room, 0)} tokens or lower --max-new-tokens to at most {context - len(p)}"
                + ("" if context - len(p) >= 1 else " (the prompt alone fills the context: it must be shortened)"))


Temperature = Union[float, str, AdaptiveDecoderHead]  # a number, "tempnet", or a head


class TemperatureBackend(MegatronBackend):
    """MegatronBackend whose per-row tau is a fixed temperature, TempNet's, or the head's choice."""

    def __init__(self, lm: LanguageModel, temperature: Temperature, latent: str = "sample",
                 generator: Optional[torch.Generator] = None, keep_hidden: bool = False, explore: float = 0.0):
        super().__init__(lm.model)
        self.lm, self.temperature, self.latent, self.explore = lm, temperature, latent, explore
        self.head = temperature if isinstance(temperature, AdaptiveDecoderHead) else None
        self.generator, self.keep_hidden = generator, keep_hidden
        self.steps: List[dict] = []  # per step: "temps" [b], and with a head "choices" [b], "hidden" [b, H]

    def _run(self):
        logits, tau = super()._run()  # the model's forward; the LM's hook has the decoder output
        hidden_all = self.lm.take_hidden()
        rows = torch.arange(len(self.seqs))
        last = torch.tensor([len(s) - 1 for s in self.seqs])
        h = hidden_all[rows, last].cpu()
        rec = {}
        if self.head is not None:
            if self.head.mode == "token" or not self.steps:
                k = self.head.choose(h, sample=self.latent == "sample", generator=self.generator)
                if self.explore > 0:  # a uniformly drawn choice instead, with probability `explore`
                    uniform = torch.randint(0, self.head.num_choices, k.shape, generator=self.generator)
                    k = torch.where(torch.rand(k.shape, generator=self.generator) < self.explore, uniform, k)
                rec["choices"] = k
                if self.keep_hidden:
                    rec["hidden"] = h
            else:
                k = self.steps[0]["choices"]
            temps = self.head.temperatures[k]
        elif self.temperature == "tempnet":
            temps = tau
        else:
            temps = torch.full((len(self.seqs),), float(self.temperature))
        rec["temps"] = temps
        self.steps.append(rec)
        return logits, temps.clamp_min(GREEDY_TAU)


@torch.no_grad()
def generate(lm: LanguageModel, prompts: Sequence[Sequence[int]], temperature: Temperature, *,
             max_new_tokens: int, generator: Optional[torch.Generator] = None, latent: str = "sample",
             keep_hidden: bool = False, explore: float = 0.0, batch_size: int = 256) -> List[Response]:
    """Generate one response per prompt (repeat a prompt to draw several), stopping at <eos>.

    temperature: a fixed value (0 = greedy), "tempnet" (the LM's TempNet tau per token), or an
    AdaptiveDecoderHead (latent "sample": draw each choice from the head; "argmax": its most likely).
    generator: the random stream of the latent choices and of the tokens. keep_hidden: store the hidden
    states of the head's choices (LPO needs them). explore: probability that a latent choice is drawn
    uniformly instead of from the head (LPO's exploration)."""
    check_prompts(prompts, max_new_tokens, lm.max_length)
    if temperature == "tempnet" and not lm.has_tempnet:
        raise AdaptiveError("temperature 'tempnet' needs an LM trained with --tempnet-enabled; this one has no TempNet")
    if not isinstance(temperature, (AdaptiveDecoderHead, str)):
        from .head import check_temperatures

        check_temperatures([temperature, temperature + 1.0])  # a fixed value must be a finite number >= 0
    elif isinstance(temperature, str) and temperature != "tempnet":
        raise AdaptiveError(f"temperature must be a number, 'tempnet' or a head; got {temperature!r}")
    if latent not in ("sample", "argmax"):
        raise AdaptiveError(f"latent must be 'sample' or 'argmax'; got {latent!r}")
    generator = generator or torch.Generator().manual_seed(0)
    out: List[Response] = []
    for start in range(0, len(prompts), batch_size):
        part = [list(p) for p in prompts[start:start + batch_size]]
        backend = TemperatureBackend(lm, temperature, latent, generator, keep_hidden, explore)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))  # the loop's own token stream
        gens = generate_tokens(backend, part, SamplingParams(max_new_tokens=max_new_tokens, seed=seed,
                                                             stop_token_ids=[lm.eos]))
        for i, g in enumerate(gens):
            n = len(g.token_ids)
            temps = [float(rec["temps"][i]) for rec in backend.steps[:n]]
            choice_steps = [rec for rec in backend.steps[:n] if "choices" in rec]
            choices = [int(rec["choices"][i]) for rec in choice_steps]
            hidden = torch.stack([rec["hidden"][i] for rec in choice_steps]) if keep_hidden and choice_steps else None
            out.append(Response(list(g.prompt_ids), list(g.token_ids), temps, choices, hidden))
    return out


def response_text(lm: LanguageModel, r: Response) -> str:
    """The response's text, without a final <eos>."""
    toks = r.tokens[:-1] if r.tokens and r.tokens[-1] == lm.eos else r.tokens
    return lm.tokenizer.detokenize(toks)
