"""Sampling with TempNet's per-token temperatures, for our checkpoints and for Hugging Face folders.

At every step each sequence's next-token logits z are divided by TempNet's tau for that position (what
the model was trained with: the DRO loss uses softmax(z / tau)), then by an optional global temperature,
then top-k / top-p filtering, then greedy choice or sampling from a seeded generator:

    backend = MegatronBackend(model)          # our model, full prefix re-run every step (no KV cache)
    backend = HFBackend(hf_model, head)       # transformers model with its KV cache; head: TempNetHead or None
    results = generate(backend, [[5, 9, 2], [7]], SamplingParams(max_new_tokens=16, top_k=50, seed=1))
    results[0].token_ids, results[0].taus

Both backends feed the same sampling code, so a converted model generates the same tokens as the
checkpoint it came from (greedy, or sampled with the same seed, up to float rounding at ties).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch


class GenerationError(ValueError):
    """A generation request that cannot run. The message names the problem and the fix."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    greedy: bool = False
    temperature: float = 1.0  # a global factor after TempNet's per-token tau (1: TempNet alone)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 1234
    stop_token_ids: Sequence[int] = ()
    use_tempnet: bool = True

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError("--max-new-tokens must be >= 1")
        if self.temperature <= 0:
            raise GenerationError("--temperature must be > 0 (use --greedy for argmax decoding)")
        if self.top_k < 0:
            raise GenerationError("--top-k must be >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            raise GenerationError("--top-p must be in (0, 1]")


@dataclass
class Generation:
    prompt_ids: List[int]
    token_ids: List[int] = field(default_factory=list)
    taus: List[Optional[float]] = field(default_factory=list)  # TempNet's tau for each generated token
    finish_reason: str = "length"  # "length" or "stop"


def warp_logits(logits: torch.Tensor, tau: Optional[torch.Tensor], params: SamplingParams) -> torch.Tensor:
    """logits [b, V] fp32, tau [b] -> the logits sampling draws from: z / tau / temperature, top-k, top-p."""
    z = logits.float()
    if tau is not None and params.use_tempnet:
        z = z / tau.float().unsqueeze(-1)
    if params.temperature != 1.0:
        z = z / params.temperature
    if params.top_k and params.top_k < z.size(-1):
        kth = torch.topk(z, params.top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
        drop_sorted = before >= params.top_p  # the most likely token is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


def choose(z: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    if params.greedy:
        return z.argmax(-1)
    return torch.multinomial(torch.softmax(z, dim=-1), 1, generator=generator).squeeze(-1)


class MegatronBackend:
    """Our model on one rank. Correctness first: every step re-runs the full prefix (no KV cache); the
    batch is right-padded, and each sequence's logits are read at its own last position (the causal
    mask keeps padding from affecting it)."""

    def __init__(self, model):
        self.model = model
        self.vocab_size = model.true_vocab_size
        self.max_length = getattr(model, "max_sequence_length", None)
        self.has_tempnet = model.tempnet is not None
        self.seqs: List[List[int]] = []

    def prefill(self, seqs: List[List[int]]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        self.seqs = [list(s) for s in seqs]
        return self._run()

    def step(self, tokens: List[int]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        for s, t in zip(self.seqs, tokens):
            s.append(int(t))
        return self._run()

    @torch.no_grad()
    def _run(self):
        from .model import forward

        lengths = torch.tensor([len(s) for s in self.seqs])
        ids = torch.zeros(len(self.seqs), int(lengths.max()), dtype=torch.long)
        for i, s in enumerate(self.seqs):
            ids[i, : len(s)] = torch.tensor(s)
        logits, tau = forward(self.model, ids)
        rows = torch.arange(len(self.seqs))
        last = (lengths - 1).to(logits.device)
        logits = logits[rows.to(logits.device), last].cpu()
        tau = tau[rows.to(tau.device), last].cpu() if tau is not None else None
        return logits, tau


class HFBackend:
    """A transformers causal LM with its KV cache: the batch is left-padded, with an attention mask and
    explicit position ids; TempNet (a TempNetHead, or None) reads each step's next-token logits."""

    def __init__(self, model, tempnet=None):
        self.model = model.eval()
        self.tempnet = tempnet.eval() if tempnet is not None else None
        self.has_tempnet = tempnet is not None
        self.vocab_size = model.config.vocab_size
        self.max_length = getattr(model.config, "max_position_embeddings", None)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def prefill(self, seqs: List[List[int]]):
        b, n = len(seqs), max(len(s) for s in seqs)
        ids = torch.zeros(b, n, dtype=torch.long)
        mask = torch.zeros(b, n, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, n - len(s):] = torch.tensor(s)
            mask[i, n - len(s):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.mask, self.position = mask.to(self.device), positions[:, -1:].to(self.device)
        out = self.model(input_ids=ids.to(self.device), attention_mask=self.mask,
                         position_ids=positions.to(self.device), use_cache=True)
        self.past = out.past_key_values
        return self._result(out.logits[:, -1])

    @torch.no_grad()
    def step(self, tokens: List[int]):
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.position = self.position + 1
        out = self.model(input_ids=torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1),
                         attention_mask=self.mask, position_ids=self.position, past_key_values=self.past,
                         use_cache=True)
        self.past = out.past_key_values
        return self._result(out.logits[:, -1])

    def _result(self, logits: torch.Tensor):
        logits = logits.float()[:, : self.vocab_size]
        tau = self.tempnet.to(logits.device)(logits) if self.tempnet is not None else None
        return logits.cpu(), (tau.cpu() if tau is not None else None)


def generate(backend, prompts: List[List[int]], params: SamplingParams) -> List[Generation]:
    """Continue every prompt (a list of token ids) by up to params.max_new_tokens tokens."""
    params.check()
    if not prompts:
        raise GenerationError("no prompts: pass at least one")
    for i, p in enumerate(prompts):
        if not p:
            raise GenerationError(f"prompt {i} has no tokens; pass some text (or token ids)")
        bad = [t for t in p if not 0 <= t < backend.vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary [0, {backend.vocab_size})")
    longest = max(len(p) for p in prompts)
    if backend.max_length and longest + params.max_new_tokens > backend.max_length:
        raise GenerationError(
            f"the longest prompt ({longest} tokens) plus --max-new-tokens {params.max_new_tokens} exceeds the "
            f"model's {backend.max_length} positions; shorten the prompt or ask for fewer tokens")
    generator = torch.Generator().manual_seed(params.seed)
    results = [Generation(prompt_ids=list(p)) for p in prompts]
    stop = set(int(t) for t in params.stop_token_ids)
    done = [False] * len(prompts)
    logits, tau = backend.prefill([list(p) for p in prompts])
    for step in range(params.max_new_tokens):
        ids = choose(warp_logits(logits, tau, params), params, generator)
        for i, r in enumerate(results):
            if done[i]:
                continue
            t = int(ids[i])
            r.token_ids.append(t)
            r.taus.append(float(tau[i]) if tau is not None else None)
            if t in stop:
                done[i], r.finish_reason = True, "stop"
        if all(done) or step == params.max_new_tokens - 1:
            break
        logits, tau = backend.step([int(t) for t in ids])
    return results
