#!/usr/bin/env python
r"""Adaptive Decoder vs every fixed temperature on the built-in task mixture (issue #8).

    python benchmarks/adaptive_decoder.py                  # ~3-5 minutes on 2 CPU cores (one thread)
    python benchmarks/adaptive_decoder.py --modes token --lpo-steps 500 --eval-prompts 512

What runs, all in this process (megatron_tempnet/adaptive/tasks.py describes the mixture):
1. a tiny GPT (2 layers, hidden 64) is trained with the project's trainer on the mixture's corpus: copy and count
   prompts whose answers are noisy (each symbol wrong with probability 0.3), name and rhyme prompts whose answers
   follow a Zipf law over 8 options;
2. for each --modes (token: a temperature per generated token; sequence: one per response) an Adaptive Decoder
   head over the temperatures {0, 0.2, ..., 1.0} is trained with LPO on the frozen LM: 16 fresh prompts per
   step, 8 samples each, the best and the worst form the pair, beta 0.1, AdamW lr 3e-3;
3. on --eval-prompts held-out prompts (a seed no training step used; equal shares of the four tasks), --eval-samples
   responses per prompt are drawn at each fixed temperature and with each head (its most likely temperature per
   choice: "argmax"; or drawn from it: "sampled"), from the same random stream. Rewards: exact answer (copy,
   count), distinctness of the samples (name, rhyme); every number is a mean over all responses, +- the standard
   error over prompts.

Reported: the table (mean reward overall and per kind, mean temperature per kind), what the head chooses per kind
(fraction of choices per temperature), the best fixed temperature and the per-kind oracle (greedy for the
deterministic prompts, the best fixed temperature for the varied ones) for reference, and a picture of the head's
choices on held-out prompts (tokens shaded by temperature). Settings were fixed before the final run.

Output: a JSON line on stdout; benchmarks/results/adaptive_decoder.md (table, verdict), .json (all figures),
adaptive_decoder_shaded.png / .html (the picture).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from benchmarks._shared import git_commit  # noqa: E402

DEFAULT_PREFIX = os.path.join(REPO, "benchmarks", "results", "adaptive_decoder")


def _parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=["token", "sequence"], choices=["token", "sequence"])
    p.add_argument("--lm-steps", type=int, default=800)
    p.add_argument("--lpo-steps", type=int, default=300)
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--samples-per-prompt", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--explore", type=float, default=0.0, help="LPO: share of latent choices drawn uniformly")
    p.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    p.add_argument("--eval-prompts", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the tensors are tiny)")
    p.add_argument("--output-prefix", default=DEFAULT_PREFIX)
    return p


def per_prompt_rewards(lm, prompts, reward, temperature, latent, n, max_new, seed):
    """Mean reward per prompt, the mean temperature per kind, the head's choices per kind."""
    import torch

    from megatron_tempnet.adaptive import tasks
    from megatron_tempnet.adaptive.head import AdaptiveDecoderHead
    from megatron_tempnet.adaptive.lpo import sample_and_score

    gen = torch.Generator().manual_seed(seed)
    groups, rewards = sample_and_score(lm, prompts, temperature, reward, n, max_new, gen, latent=latent)
    rows = []
    for p, g, r in zip(prompts, groups, rewards):
        rows.append({"task": tasks.task_of(p), "kind": tasks.TASKS[tasks.task_of(p)], "reward": sum(r) / len(r),
                     "temps": [t for resp in g for t in resp.temperatures],
                     "choices": [k for resp in g for k in resp.choices]})
    K = temperature.num_choices if isinstance(temperature, AdaptiveDecoderHead) else 0
    return rows, K


def mean_se(values: List[float]) -> tuple:
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return m, sd / math.sqrt(n)


def summarize(rows, K, temperatures) -> dict:
    out = {"reward": mean_se([r["reward"] for r in rows])}
    for key in ("kind", "task"):
        for name in sorted({r[key] for r in rows}):
            sel = [r for r in rows if r[key] == name]
            out[f"reward_{name}"] = mean_se([r["reward"] for r in sel])
            temps = [t for r in sel for t in r["temps"]]
            out[f"tau_{name}"] = sum(temps) / max(len(temps), 1)
            if K:
                ch = [k for r in sel for k in r["choices"]]
                out[f"choices_{name}"] = {f"{temperatures[j]:g}": ch.count(j) / max(len(ch), 1) for j in range(K)}
    return out


def table(results: Dict[str, dict]) -> str:
    kinds = ["deterministic", "varied"]
    tasks_ = ["copy", "count", "name", "rhyme"]
    head = ("| decoding | mean reward | " + " | ".join(f"{k}" for k in kinds) + " | "
            + " | ".join(tasks_) + " | mean tau: det. | mean tau: varied |")
    lines = [head, "|" + "---|" * (4 + len(tasks_) + 2)]
    fixed_best = max(v["reward"][0] for k, v in results.items() if k.startswith("fixed"))
    for name, v in results.items():
        m, se = v["reward"]
        cell = f"{m:.3f} +- {se:.3f}"
        if not name.startswith("fixed") and m > fixed_best:
            cell = f"**{cell}**"
        lines.append(f"| {name} | {cell} | " + " | ".join(f"{v['reward_' + k][0]:.3f}" for k in kinds) + " | "
                     + " | ".join(f"{v['reward_' + t][0]:.3f}" for t in tasks_)
                     + f" | {v['tau_deterministic']:.2f} | {v['tau_varied']:.2f} |")
    return "\n".join(lines)


def choices_table(results: Dict[str, dict], temperatures) -> str:
    cols = [f"{t:g}" for t in temperatures]
    lines = ["| head | prompts | " + " | ".join(f"tau {c}" for c in cols) + " |", "|" + "---|" * (2 + len(cols))]
    for name, v in results.items():
        if name.startswith("fixed") or "argmax" not in name:
            continue
        for kind in ("deterministic", "varied"):
            ch = v[f"choices_{kind}"]
            lines.append(f"| {name} | {kind} | " + " | ".join(f"{100 * ch[c]:.0f}%" for c in cols) + " |")
    return "\n".join(lines)


def picture(lm, head, prompts, path_prefix, seed) -> None:
    """The head's choices on a few held-out prompts, shaded by temperature (HTML and PNG)."""
    import torch

    from megatron_tempnet.adaptive.sampling import generate
    from megatron_tempnet.adaptive.shade import render_html, render_png, token_strings

    gen = torch.Generator().manual_seed(seed)
    ids = [lm.tokenizer.tokenize(p) for p in prompts]
    tokens, temps = [], []
    for p, pid, r in zip(prompts, ids, generate(lm, ids, head, max_new_tokens=6, generator=gen, latent="argmax")):
        tokens += [p] + [" " + t for t in token_strings(lm.tokenizer, r.tokens)] + ["\n"]
        temps += [None] + r.temperatures + [None]
    lo, hi = float(head.temperatures.min()), float(head.temperatures.max())
    title = f"Adaptive Decoder ({head.mode} mode): temperature chosen per generated token"
    render_html(tokens[:-1], temps[:-1], path_prefix + ".html", vmin=lo, vmax=hi, title=title)
    render_png(tokens[:-1], temps[:-1], path_prefix + ".png", vmin=lo, vmax=hi, width=720, title=title)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from megatron_tempnet import runtime
    from megatron_tempnet.adaptive import tasks
    from megatron_tempnet.adaptive.head import AdaptiveDecoderHead
    from megatron_tempnet.training.in_process import train_mixture_lm
    from megatron_tempnet.adaptive.lpo import LPOSettings, train_lpo
    from megatron_tempnet.adaptive.rewards import BUILTIN, load_reward

    torch.set_num_threads(args.threads)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    timings = {}
    results: Dict[str, dict] = {}
    histories = {}
    try:
        lm = train_mixture_lm(args.lm_steps, args.seed, log)
        timings["lm_s"] = time.perf_counter() - t0
        reward = load_reward(BUILTIN)
        group_of = lambda p: tasks.TASKS[tasks.task_of(p)]  # noqa: E731
        eval_prompts = tasks.make_prompts(args.eval_prompts, args.seed * 7919 - 1)
        max_new = tasks.MAX_NEW_TOKENS
        for t in args.temperatures:
            rows, K = per_prompt_rewards(lm, eval_prompts, reward, t, "sample", args.eval_samples, max_new, args.seed + 1)
            results[f"fixed tau = {t:g}"] = summarize(rows, K, args.temperatures)
        heads = {}
        for mode in args.modes:
            t1 = time.perf_counter()
            head = AdaptiveDecoderHead(lm.hidden_size, args.temperatures, mode, seed=args.seed)
            s = LPOSettings(beta=args.beta, lr=args.lr, steps=args.lpo_steps, prompts_per_step=args.prompts_per_step,
                            samples_per_prompt=args.samples_per_prompt, max_new_tokens=max_new, seed=args.seed,
                            explore=args.explore, log_interval=50)
            histories[mode] = train_lpo(lm, head, lambda step: tasks.make_prompts(args.prompts_per_step,
                                                                                 args.seed * 7919 + step),
                                        reward, s, log, group_of)
            timings[f"lpo_{mode}_s"] = time.perf_counter() - t1
            heads[mode] = head
            for latent, label in (("argmax", "argmax"), ("sample", "sampled")):
                rows, K = per_prompt_rewards(lm, eval_prompts, reward, head, latent, args.eval_samples, max_new,
                                             args.seed + 1)
                results[f"adaptive ({mode}, {label})"] = summarize(rows, K, args.temperatures)
        pic_prompts = [tasks.make_prompts(8, args.seed * 7919 - 2)[i] for i in (0, 1, 2, 3, 4, 6, 7)]
        picture(lm, heads[args.modes[0]], pic_prompts, args.output_prefix + "_shaded", args.seed)
    finally:
        runtime.destroy_distributed()

    fixed = {k: v for k, v in results.items() if k.startswith("fixed")}
    best_fixed_name = max(fixed, key=lambda k: fixed[k]["reward"][0])
    best_fixed = fixed[best_fixed_name]["reward"][0]
    oracle_varied = max(v["reward_varied"][0] for v in fixed.values())
    oracle = (fixed[f"fixed tau = {min(args.temperatures):g}"]["reward_deterministic"][0] + oracle_varied) / 2
    primary = f"adaptive ({args.modes[0]}, argmax)"
    verdicts = []
    for name, v in results.items():
        if name.startswith("fixed"):
            continue
        beats = v["reward"][0] > best_fixed
        low_high = v["tau_deterministic"] < v["tau_varied"]
        verdicts.append(f"- {name}: mean reward {v['reward'][0]:.3f} {'beats' if beats else 'does NOT beat'} the best "
                        f"fixed temperature ({best_fixed_name}: {best_fixed:.3f}); mean temperature "
                        f"{v['tau_deterministic']:.2f} on the deterministic prompts and {v['tau_varied']:.2f} on the "
                        f"varied ones ({'lower on the deterministic ones' if low_high else 'NOT lower on the deterministic ones'}).")
    md = ["# Adaptive Decoder vs fixed temperatures on the built-in task mixture\n",
          f"`python benchmarks/adaptive_decoder.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}, commit {git_commit()}, {time.perf_counter() - t0:.0f} s "
          f"(LM {timings['lm_s']:.0f} s; " + ", ".join(f"LPO {m} {timings[f'lpo_{m}_s']:.0f} s" for m in args.modes)
          + f"; {args.threads} thread, 2-core machine shared with other jobs)\n",
          *verdicts, "",
          f"Mean reward per response on {args.eval_prompts} held-out prompts ({args.eval_prompts // 4} per task) x "
          f"{args.eval_samples} samples, +- standard error over prompts. Bold: beats every fixed temperature. "
          f"For reference, the per-kind oracle (greedy on deterministic prompts, the best fixed temperature on the "
          f"varied ones) scores {oracle:.3f}.\n",
          table(results), "",
          "What each head picks (its most likely temperature per choice; token mode: per generated token, "
          "sequence mode: per response):\n", choices_table(results, args.temperatures), "",
          f"Settings: LM {args.lm_steps} steps (GPT 2 x 64, the project's trainer); LPO {args.lpo_steps} steps x "
          f"{args.prompts_per_step} prompts x {args.samples_per_prompt} samples, beta {args.beta}, lr {args.lr}, "
          f"temperatures {args.temperatures}, seed {args.seed}. The mixture: copy / count answers noisy at 0.3 per "
          "symbol in the LM's corpus (reward: exact answer), name / rhyme answers Zipf over 8 options (reward: "
          "distinctness among the samples of a prompt).", "",
          f"Picture: {os.path.basename(args.output_prefix)}_shaded.png (the {args.modes[0]}-mode head on held-out "
          "prompts; blue = cold, red = hot, grey = prompt)."]
    with open(args.output_prefix + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    with open(args.output_prefix + ".json", "w") as f:
        json.dump({"results": results, "settings": vars(args), "timings": timings, "oracle": oracle,
                   "history_every_10_steps": {m: hs[9::10] for m, hs in histories.items()}}, f)
    print("\n".join(md[3:]), file=sys.stderr)
    print(json.dumps({"benchmark": "adaptive_decoder", "best_fixed": best_fixed_name, "best_fixed_reward": best_fixed,
                      **{k: v["reward"][0] for k, v in results.items() if not k.startswith("fixed")},
                      "primary_beats_every_fixed": results[primary]["reward"][0] > best_fixed,
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
