"""Settings of an Adaptive Decoder run: a flat YAML file plus flags (a flag is the key with dashes).

    cfg = load_adaptive_config(["--config", "examples/configs/adaptive_decoder.yaml", "--mode", "sequence"])

Flags override the YAML file, which overrides the defaults below. Unknown YAML keys are an error.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import yaml

from ..cli_help import HelpFormatter, describe_default
from .head import DEFAULT_TEMPERATURES, check_mode, check_temperatures
from .lm import AdaptiveError


@dataclass
class AdaptiveConfig:
    # the LM (frozen) and its prompts
    checkpoint: Optional[str] = None  # our checkpoint (save or iter_N folder); with --task-mixture and none: train one
    tokenizer_model: Optional[str] = None  # default: the checkpoint's
    task_mixture: bool = False  # built-in prompts, reward and tokenizer (adaptive/tasks.py)
    lm_steps: int = 800  # steps of the mixture LM trained when --task-mixture has no --checkpoint
    prompts: Optional[str] = None  # .txt (one prompt per line) or .jsonl ({"prompt": ...}) for training
    eval_prompts_file: Optional[str] = None  # held-out prompts for the final table (default: the training prompts)
    reward: Optional[str] = None  # module:function, FILE.py:function, or a reward model folder
    # the head
    temperatures: List[float] = field(default_factory=lambda: list(DEFAULT_TEMPERATURES))
    mode: str = "token"  # "token": a temperature per generated token; "sequence": one per response
    head_hidden_size: int = 128
    # LPO
    beta: float = 0.1
    lr: float = 3e-3
    steps: int = 150
    prompts_per_step: int = 16
    samples_per_prompt: int = 8
    max_new_tokens: Optional[int] = None  # default: 6 with --task-mixture, else 32
    clip_grad: float = 1.0
    explore: float = 0.0  # probability that a latent choice is drawn uniformly instead of from the head, in LPO
    seed: int = 1234
    log_interval: int = 10
    threads: Optional[int] = None  # torch threads; default 1 with --task-mixture (tiny tensors), else torch's
    # evaluation and output
    eval_prompts: int = 64  # --task-mixture: held-out prompts in the final table
    eval_samples: int = 8  # responses per prompt in the final table
    save: Optional[str] = None  # folder for the head (adaptive_decoder.pt + .json) and the table


HELP = {
    "checkpoint": "the frozen LM: one of our checkpoints (a save folder or an iter_N folder)",
    "tokenizer_model": "the LM's tokenizer (default: the one named in the checkpoint)",
    "task_mixture": "use the built-in task mixture (prompts, reward, tokenizer; --prompts / --reward replace its own); "
                    "trains its tiny LM without --checkpoint",
    "lm_steps": "training steps of the mixture's LM when --task-mixture has no --checkpoint",
    "prompts": "training prompts: .txt (one per line) or .jsonl ({\"prompt\": ...} per line)",
    "eval_prompts_file": "held-out prompts for the final table (default: the training prompts)",
    "reward": "module:function, FILE.py:function (f(prompt, responses) -> floats), or a reward model folder",
    "temperatures": "the temperature set the head chooses from (>= 0; 0 = greedy)",
    "mode": "token (a choice per generated token) or sequence (one per response)",
    "head_hidden_size": "width of the head's two hidden layers",
    "beta": "DPO temperature on the latent log-probability margin",
    "lr": "the head's learning rate (AdamW)",
    "steps": "LPO steps",
    "prompts_per_step": "prompts per LPO step",
    "samples_per_prompt": "responses sampled per prompt (best vs worst form the preference pair)",
    "max_new_tokens": "tokens generated per response (default 6 with --task-mixture, else 32)",
    "clip_grad": "gradient-norm clipping of the head (0: off)",
    "explore": "LPO sampling: probability that a latent choice is drawn uniformly instead of from the head (0: on-policy)",
    "seed": "seed of the head, the sampling and the mixture's prompts",
    "log_interval": "log every N LPO steps",
    "threads": "torch threads (default: 1 with --task-mixture, whose tensors are tiny; else torch's default)",
    "eval_prompts": "--task-mixture: number of held-out prompts in the final table",
    "eval_samples": "responses per prompt in the final table",
    "save": "output folder: the head (adaptive_decoder.pt/.json), history.json, table.md",
}


def _types() -> dict:
    return typing.get_type_hints(AdaptiveConfig)


def _base(tp):
    """int for Optional[int]; other types as they are."""
    if typing.get_origin(tp) is typing.Union:
        return [a for a in typing.get_args(tp) if a is not type(None)][0]
    return tp


def _parser(doc: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_adaptive_decoder.py",
        description=(doc.split("\n\n")[0] if doc else "Train an Adaptive Decoder head on a frozen LM with LPO.")
        + " Flags override --config.",
        epilog=doc.split("\n\n", 1)[1] if doc and "\n\n" in doc else None,
        formatter_class=HelpFormatter)
    p.add_argument("--config", help="YAML file of the keys below (underscores) (default: none)")
    defaults = AdaptiveConfig()
    for name, tp in _types().items():
        base = _base(tp)
        flag = "--" + name.replace("_", "-")
        shown = argparse.Namespace(default=getattr(defaults, name), required=False, nargs=None)
        text = HELP[name] if "default" in HELP[name] else f"{HELP[name]} ({describe_default(shown)})"  # the
        # parser's own default is None ("not given", so that --config can set it): show the config's
        if base is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typing.get_origin(base) is list:
            p.add_argument(flag, dest=name, nargs="+", type=float, default=None, help=text)
        else:
            p.add_argument(flag, dest=name, type=base, default=None, help=text)
    return p


def load_adaptive_config(argv: Optional[list] = None, doc: Optional[str] = None) -> AdaptiveConfig:
    args = _parser(doc).parse_args(argv)
    cfg = AdaptiveConfig()
    known = _types()
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise AdaptiveError(f"config file {path} not found; pass an existing YAML file to --config")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise AdaptiveError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise AdaptiveError(f"config file {path} must be a mapping of keys ({', '.join(known)})")
        for key, value in data.items():
            if key not in known:
                hint = difflib.get_close_matches(key, list(known), n=1)
                raise AdaptiveError(f"{path}: unknown key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else
                                                                      f"; valid keys: {', '.join(known)}"))
            setattr(cfg, key, _coerce(key, value, known[key], path))
    for key in known:
        value = getattr(args, key)
        if value is not None:
            setattr(cfg, key, value)
    check_config(cfg)
    return cfg


def _coerce(key, value, tp, path):
    base = _base(tp)
    if value is None:
        return None
    if typing.get_origin(base) is list:
        if not isinstance(value, list):
            raise AdaptiveError(f"{path}: '{key}' must be a list, e.g. [0.0, 0.5, 1.0]")
        return value
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (base is not bool and isinstance(value, bool)) or not isinstance(value, base):
        raise AdaptiveError(f"{path}: '{key}' must be {base.__name__}, got {value!r}")
    return value


def check_config(cfg: AdaptiveConfig) -> None:
    """Refuse settings that cannot run, before any model is built."""
    cfg.temperatures = check_temperatures(cfg.temperatures)
    check_mode(cfg.mode)
    if not cfg.task_mixture:
        if not cfg.checkpoint:
            raise AdaptiveError("no LM: pass --checkpoint DIR (one of our checkpoints), or --task-mixture to use "
                                "the built-in tasks (a tiny LM is trained for them when --checkpoint is absent)")
        if not cfg.prompts:
            raise AdaptiveError("no prompts: pass --prompts FILE (.txt, one prompt per line, or .jsonl with "
                                "{\"prompt\": ...}), or --task-mixture")
        if not cfg.reward:
            raise AdaptiveError("no reward: pass --reward module:function (called as f(prompt, responses) -> list of "
                                "floats) or a reward model folder, or --task-mixture")
    if cfg.lm_steps < 1 or cfg.eval_prompts < 1 or cfg.eval_samples < 2:
        raise AdaptiveError("--lm-steps and --eval-prompts must be >= 1 and --eval-samples >= 2")
    if cfg.max_new_tokens is not None and cfg.max_new_tokens < 1:
        raise AdaptiveError(f"--max-new-tokens must be >= 1; got {cfg.max_new_tokens}")


def config_dict(cfg: AdaptiveConfig) -> dict:
    return dataclasses.asdict(cfg)
