"""Latent Preference Optimization (LPO): train the Adaptive Decoder head from rewards, the LM frozen.

Each step (Dhuliawala et al. 2024, section 3):
1. draw a batch of prompts; sample N responses to each, the head choosing the temperatures (token mode: one
   latent choice per generated token; sequence mode: one per response) and the LM sampling at them;
2. score the N responses of each prompt with the reward function (all at once: it may reward distinctness);
3. per prompt, the best response is "chosen" and the worst "rejected" (no pair when all rewards tie);
4. minimise the DPO loss on the latent choices, with a frozen copy of the initial head as the reference:

       log pi(y) = sum over the response's latent choices of log p_head(k_t | h_t)
       L = - log sigmoid( beta * ( [log pi(y_c) - log pi_ref(y_c)] - [log pi(y_r) - log pi_ref(y_r)] ) )

The hidden states h_t are recorded during sampling, so the update runs the head only, never the LM.
"""
from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .head import AdaptiveDecoderHead
from .lm import AdaptiveError, LanguageModel
from .rewards import RewardFunction
from .sampling import Response, Temperature, check_prompts, generate, response_text


@dataclass
class LPOSettings:
    beta: float = 0.1  # DPO temperature on the latent log-probability margin
    lr: float = 1e-3
    steps: int = 200
    prompts_per_step: int = 16
    samples_per_prompt: int = 8  # N: responses per prompt (the best and the worst form the pair)
    max_new_tokens: int = 6
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    explore: float = 0.0  # probability that a latent choice is drawn uniformly instead of from the head
    seed: int = 1234
    log_interval: int = 10


def check_settings(s: LPOSettings) -> None:
    if not (math.isfinite(s.beta) and s.beta > 0):
        raise AdaptiveError(f"--beta must be a positive number (the DPO temperature, e.g. 0.1); got {s.beta}")
    if not (math.isfinite(s.lr) and s.lr > 0):
        raise AdaptiveError(f"--lr must be positive; got {s.lr}")
    if s.samples_per_prompt < 2:
        raise AdaptiveError(f"--samples-per-prompt must be >= 2 (a chosen and a rejected response); got {s.samples_per_prompt}")
    if s.prompts_per_step < 1 or s.steps < 0:
        raise AdaptiveError("--prompts-per-step must be >= 1 and --steps >= 0")
    if s.max_new_tokens < 1:
        raise AdaptiveError(f"--max-new-tokens must be >= 1; got {s.max_new_tokens}")
    if not 0 <= s.explore <= 1:
        raise AdaptiveError(f"--explore is a probability in [0, 1]; got {s.explore}")


def latent_logprob(head: AdaptiveDecoderHead, responses: Sequence[Response]) -> torch.Tensor:
    """Sum of log p_head(choice | hidden) over each response's latent choices: [len(responses)]."""
    hidden = torch.cat([r.hidden for r in responses])
    choices = torch.tensor([k for r in responses for k in r.choices], dtype=torch.long)
    segment = torch.tensor([i for i, r in enumerate(responses) for _ in r.choices], dtype=torch.long)
    logp = head(hidden).gather(-1, choices.unsqueeze(-1)).squeeze(-1)
    return torch.zeros(len(responses), dtype=logp.dtype).index_add(0, segment, logp)


def lpo_loss(head: AdaptiveDecoderHead, ref: AdaptiveDecoderHead, chosen: Sequence[Response],
             rejected: Sequence[Response], beta: float) -> Tuple[torch.Tensor, dict]:
    """The DPO loss on the latent choices of (chosen, rejected) pairs, and statistics."""
    pc, pr = latent_logprob(head, chosen), latent_logprob(head, rejected)
    with torch.no_grad():
        rc, rr = latent_logprob(ref, chosen), latent_logprob(ref, rejected)
    margin = beta * ((pc - rc) - (pr - rr))
    loss = -F.logsigmoid(margin).mean()
    margin = margin.detach()
    return loss, {"margin": float(margin.mean()), "pair_accuracy": float((margin > 0).float().mean())}


def make_pairs(groups: Sequence[Sequence[Response]], rewards: Sequence[Sequence[float]],
               rng: Optional[random.Random] = None) -> Tuple[List[Response], List[Response]]:
    """Best vs worst response of each prompt (ties broken at random); prompts whose rewards all tie give none."""
    rng = rng or random.Random(0)
    chosen, rejected = [], []
    for resp, r in zip(groups, rewards):
        hi, lo = max(r), min(r)
        if hi - lo <= 1e-12:
            continue
        chosen.append(resp[rng.choice([i for i, v in enumerate(r) if v == hi])])
        rejected.append(resp[rng.choice([i for i, v in enumerate(r) if v == lo])])
    return chosen, rejected


def sample_and_score(lm: LanguageModel, prompts: Sequence[str], temperature: Temperature, reward: RewardFunction,
                     n: int, max_new_tokens: int, generator: torch.Generator, latent: str = "sample",
                     keep_hidden: bool = False, explore: float = 0.0) -> Tuple[List[List[Response]], List[List[float]]]:
    """n responses per prompt and their rewards, grouped by prompt."""
    ids = [lm.tokenizer.tokenize(p) for p in prompts]
    check_prompts(ids, max_new_tokens, lm.max_length, prompts)
    flat = [p for p in ids for _ in range(n)]
    responses = generate(lm, flat, temperature, max_new_tokens=max_new_tokens, generator=generator,
                         latent=latent, keep_hidden=keep_hidden, explore=explore)
    groups = [responses[i * n:(i + 1) * n] for i in range(len(prompts))]
    rewards = [reward(p, [response_text(lm, r) for r in g]) for p, g in zip(prompts, groups)]
    return groups, rewards


def train_lpo(lm: LanguageModel, head: AdaptiveDecoderHead, prompt_source: Callable[[int], List[str]],
              reward: RewardFunction, s: LPOSettings, log: Optional[Callable[[str], None]] = None,
              group_of: Optional[Callable[[str], str]] = None) -> List[dict]:
    """Train `head` in place with LPO for s.steps steps. prompt_source(step) gives that step's prompt texts;
    group_of(prompt) (optional) names a prompt's group for the logged temperature statistics.
    Returns one record per step (mean reward, pairs, loss, margin, chosen temperatures)."""
    check_settings(s)
    ref = copy.deepcopy(head).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(head.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    gen = torch.Generator().manual_seed(s.seed)
    rng = random.Random(s.seed)
    history: List[dict] = []
    t0 = time.perf_counter()
    for step in range(1, s.steps + 1):
        prompts = prompt_source(step)
        groups, rewards = sample_and_score(lm, prompts, head, reward, s.samples_per_prompt, s.max_new_tokens,
                                           gen, latent="sample", keep_hidden=True, explore=s.explore)
        chosen, rejected = make_pairs(groups, rewards, rng)
        rec = {"step": step, "reward": sum(map(sum, rewards)) / sum(map(len, rewards)), "pairs": len(chosen)}
        if chosen:
            loss, stats = lpo_loss(head, ref, chosen, rejected, s.beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if s.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(head.parameters(), s.clip_grad)
            opt.step()
            rec.update(loss=float(loss.detach()), **stats)
        temps: Dict[str, List[float]] = {}
        for p, g in zip(prompts, groups):
            key = group_of(p) if group_of else "all"
            temps.setdefault(key, []).extend(t for r in g for t in r.temperatures)
        rec["temperature"] = {k: sum(v) / max(len(v), 1) for k, v in temps.items()}
        history.append(rec)
        if log and (step % s.log_interval == 0 or step == s.steps):
            recent = history[-s.log_interval:]
            temp_txt = " ".join(f"{k} {v:.2f}" for k, v in sorted(rec["temperature"].items()))
            log(f"LPO step {step}/{s.steps} | reward {sum(h['reward'] for h in recent) / len(recent):.3f} | "
                f"loss {rec.get('loss', float('nan')):.4f} | pairs {rec['pairs']} | mean tau: {temp_txt} | "
                f"{time.perf_counter() - t0:.1f} s")
    return history


def evaluate(lm: LanguageModel, prompts: Sequence[str], reward: RewardFunction, arms: Dict[str, Tuple[Temperature, str]],
             samples_per_prompt: int, max_new_tokens: int, seed: int = 0,
             group_of: Optional[Callable[[str], str]] = None) -> Dict[str, dict]:
    """Mean reward of each arm (a fixed temperature, "tempnet", or a head with its latent mode) over the same
    prompts, the same number of samples and the same random stream. Per arm: "reward", "by_group" (mean reward
    per prompt group), "temperature" / "temperature_by_group" (mean temperature used per generated token) and,
    for heads, "choices_by_group" (fraction of latent choices per temperature)."""
    out: Dict[str, dict] = {}
    for name, (temperature, latent) in arms.items():
        gen = torch.Generator().manual_seed(seed)
        groups, rewards = sample_and_score(lm, prompts, temperature, reward, samples_per_prompt, max_new_tokens,
                                           gen, latent=latent)
        acc: Dict[str, dict] = {}
        for p, g, r in zip(prompts, groups, rewards):
            a = acc.setdefault(group_of(p) if group_of else "all", {"rewards": [], "temps": [], "choices": []})
            a["rewards"].extend(r)
            a["temps"].extend(t for resp in g for t in resp.temperatures)
            a["choices"].extend(k for resp in g for k in resp.choices)
        all_r = [v for r in rewards for v in r]
        all_t = [t for a in acc.values() for t in a["temps"]]
        row = {"reward": sum(all_r) / len(all_r),
               "by_group": {k: sum(a["rewards"]) / len(a["rewards"]) for k, a in sorted(acc.items())},
               "temperature": sum(all_t) / max(len(all_t), 1),
               "temperature_by_group": {k: sum(a["temps"]) / max(len(a["temps"]), 1) for k, a in sorted(acc.items())}}
        if isinstance(temperature, AdaptiveDecoderHead):
            K = temperature.num_choices
            row["choices_by_group"] = {
                k: [a["choices"].count(j) / max(len(a["choices"]), 1) for j in range(K)] for k, a in sorted(acc.items())}
        out[name] = row
    return out


def settings_dict(s: LPOSettings) -> dict:
    return asdict(s)
