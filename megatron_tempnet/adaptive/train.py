"""An Adaptive Decoder run: load (or train) the LM, train the head with LPO, compare it with every fixed
temperature of its set, save the head and the table. Entry point of tools/train_adaptive_decoder.py.

Training the task mixture's LM is the trainer's job (training/in_process.py: train_mixture_lm); the caller
passes that function in, so that adaptive decoding does not depend on the trainer."""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch

from .config import AdaptiveConfig, config_dict, load_adaptive_config
from .head import AdaptiveDecoderHead
from .lm import AdaptiveError, LanguageModel, check_mixture_model, mixture_lm_config
from .lpo import LPOSettings, evaluate, train_lpo
from .rewards import BUILTIN, load_reward


def read_prompts(path: str) -> List[str]:
    """Prompts from a .txt file (one per line) or a .jsonl file ({"prompt": ...} per line)."""
    p = Path(path)
    if not p.is_file():
        raise AdaptiveError(f"prompt file {p} not found; pass an existing .txt or .jsonl file to --prompts")
    prompts = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if p.suffix == ".jsonl":
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise AdaptiveError(f"{p}:{n} is not a JSON object; each line of a .jsonl prompt file is "
                                    '{"prompt": "..."}') from None
            text = obj.get("prompt") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise AdaptiveError(f"{p}:{n} has no string 'prompt' field; each line is {{\"prompt\": \"...\"}}")
        else:
            text = line
        if not text.strip():
            raise AdaptiveError(f"{p}:{n}: the prompt is empty; remove empty lines from the prompt file "
                                "(every line of a .txt file is one prompt)")
        prompts.append(text)
    if not prompts:
        raise AdaptiveError(f"prompt file {p} holds no prompts; write one prompt per line")
    return prompts


def cycling_prompts(prompts: List[str], per_step: int, seed: int) -> Callable[[int], List[str]]:
    """prompt_source for LPO: consecutive slices of a shuffled order, reshuffled at each pass."""
    rng = random.Random(seed)
    order: List[str] = []

    def source(step: int) -> List[str]:
        out = []
        while len(out) < per_step:
            if not order:
                order.extend(rng.sample(prompts, len(prompts)))
            out.append(order.pop())
        return out

    return source


def format_table(results: dict, groups: Optional[List[str]] = None) -> str:
    """A markdown table: one row per arm, mean reward overall and per group, mean temperature per group.
    An adaptive row whose mean reward beats every fixed temperature is in bold."""
    groups = groups or sorted(next(iter(results.values()))["by_group"])
    rows = ["| decoding | mean reward | " + " | ".join(f"reward: {g}" for g in groups) + " | "
            + " | ".join(f"mean tau: {g}" for g in groups) + " |",
            "|" + "---|" * (2 + 2 * len(groups))]
    fixed = [v["reward"] for k, v in results.items() if k.startswith("fixed")]
    best_fixed = max(fixed) if fixed else float("inf")
    for name, v in results.items():
        r = f"{v['reward']:.3f}"
        if not name.startswith("fixed") and v["reward"] > best_fixed:
            r = f"**{r}**"
        rows.append(f"| {name} | {r} | " + " | ".join(f"{v['by_group'][g]:.3f}" for g in groups) + " | "
                    + " | ".join(f"{v['temperature_by_group'][g]:.2f}" for g in groups) + " |")
    return "\n".join(rows)


def fixed_arms(temperatures: List[float]) -> dict:
    return {f"fixed tau = {t:g}": (t, "sample") for t in temperatures}


# train_mixture_lm(steps, seed, log, save=folder or None) -> the trained LM (training.in_process.train_mixture_lm)
MixtureLMTrainer = Callable[..., LanguageModel]


def run(cfg: AdaptiveConfig, log: Callable[[str], None] = print,
        train_mixture_lm: Optional[MixtureLMTrainer] = None) -> dict:
    """The whole run. Returns {"history", "results", "table"}; writes them and the head to cfg.save.
    train_mixture_lm: trains the task mixture's LM when --task-mixture comes without --checkpoint."""
    from . import tasks

    torch.manual_seed(cfg.seed)
    threads = cfg.threads if cfg.threads is not None else (1 if cfg.task_mixture else None)
    if threads:
        torch.set_num_threads(threads)
    from .sampling import check_prompts

    # prompts and reward first: a bad file or reward fails before any model work
    reward = load_reward(cfg.reward or (BUILTIN if cfg.task_mixture else ""))
    prompts = read_prompts(cfg.prompts) if cfg.prompts else None
    eval_prompts = read_prompts(cfg.eval_prompts_file) if cfg.eval_prompts_file else prompts
    group_of = None
    if prompts is None:  # the mixture's own prompts: fresh ones every step, held-out ones for the table
        source = lambda step: tasks.make_prompts(cfg.prompts_per_step, cfg.seed * 7919 + step)  # noqa: E731
        eval_prompts = eval_prompts or tasks.make_prompts(cfg.eval_prompts, cfg.seed * 7919 - 1)  # unused seed
        group_of = lambda p: tasks.TASKS[tasks.task_of(p)]  # noqa: E731
    else:
        source = cycling_prompts(prompts, cfg.prompts_per_step, cfg.seed)
    if cfg.task_mixture:
        tokenizer = tasks.MixtureTokenizer()
        max_new = cfg.max_new_tokens or tasks.MAX_NEW_TOKENS
        context = mixture_lm_config().model.seq_length
        for ps in (prompts or source(0), eval_prompts):
            try:
                ids = [tokenizer.tokenize(p) for p in ps]
            except ValueError as err:
                raise AdaptiveError(f"a prompt does not fit the task mixture: {err}") from None
            if not cfg.checkpoint:
                check_prompts(ids, max_new, context, ps)
        if cfg.checkpoint:
            lm = LanguageModel.from_checkpoint(cfg.checkpoint, tokenizer)
            check_mixture_model(lm.cfg)
        else:
            if train_mixture_lm is None:
                raise TypeError("run() trains the task mixture's LM (no --checkpoint): pass train_mixture_lm="
                                "training.in_process.train_mixture_lm")
            log(f"training the task mixture's LM ({cfg.lm_steps} steps)")
            lm = train_mixture_lm(cfg.lm_steps, cfg.seed, log, save=str(Path(cfg.save) / "lm") if cfg.save else None)
    else:
        tokenizer = None
        if cfg.tokenizer_model:
            from ..data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(cfg.tokenizer_model)
        lm = LanguageModel.from_checkpoint(cfg.checkpoint, tokenizer)
        max_new = cfg.max_new_tokens or 32
    for ps in (prompts or source(0), eval_prompts):  # refuse empty or too long prompts before training
        check_prompts([lm.tokenizer.tokenize(p) for p in ps], max_new, lm.max_length, ps)

    head = AdaptiveDecoderHead(lm.hidden_size, cfg.temperatures, cfg.mode, cfg.head_hidden_size, seed=cfg.seed)
    settings = LPOSettings(beta=cfg.beta, lr=cfg.lr, steps=cfg.steps, prompts_per_step=cfg.prompts_per_step,
                           samples_per_prompt=cfg.samples_per_prompt, max_new_tokens=max_new,
                           clip_grad=cfg.clip_grad, explore=cfg.explore, seed=cfg.seed, log_interval=cfg.log_interval)
    t0 = time.perf_counter()
    history = train_lpo(lm, head, source, reward, settings, log, group_of)
    train_s = time.perf_counter() - t0
    arms = fixed_arms(cfg.temperatures)
    arms[f"adaptive ({cfg.mode}, argmax)"] = (head, "argmax")
    arms[f"adaptive ({cfg.mode}, sampled)"] = (head, "sample")
    results = evaluate(lm, eval_prompts, reward, arms, cfg.eval_samples, max_new, seed=cfg.seed + 1, group_of=group_of)
    table = format_table(results)
    log(table)
    out = {"history": history, "results": results, "table": table, "lpo_seconds": train_s}
    if cfg.save:
        head.save(cfg.save, {"config": config_dict(cfg), "results": results, "lm_checkpoint": cfg.checkpoint})
        Path(cfg.save, "history.json").write_text(json.dumps(history))
        Path(cfg.save, "table.md").write_text(table + "\n")
        log(f"saved the head to {cfg.save}")
    return out


def main(argv: Optional[list] = None, doc: Optional[str] = None,
         train_mixture_lm: Optional[MixtureLMTrainer] = None) -> int:
    """The command line of tools/train_adaptive_decoder.py (run's train_mixture_lm passed on); the exit code."""
    from ..cli import quiet_megatron_import_warnings

    quiet_megatron_import_warnings()
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    from .. import runtime

    try:
        cfg = load_adaptive_config(argv, doc)
        run(cfg, log=lambda m: print(m, flush=True), train_mixture_lm=train_mixture_lm)
    except AdaptiveError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        runtime.destroy_distributed()
    return 0
