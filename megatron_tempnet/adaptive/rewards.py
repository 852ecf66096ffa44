"""Rewards for LPO: a Python callable the user names, or a reward model folder (Hugging Face transformers).

A reward function scores all the responses to one prompt together (so it can reward distinctness):

    def my_reward(prompt: str, responses: list[str]) -> list[float]: ...

`load_reward("package.module:function")`, `load_reward("path/to/file.py:function")`, or
`load_reward("path/to/reward_model_folder")` (AutoModelForSequenceClassification + AutoTokenizer; the score of
a response is the model's output on prompt + response: the single logit when num_labels == 1, else the
log-probability of the last label). Whatever the source, `RewardFunction` checks every result: an exception,
a wrong count, a non-number or a NaN / infinite value is an AdaptiveError that names the function, the prompt,
the response and the fix.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
from pathlib import Path
from typing import Callable, List, Sequence

from .lm import AdaptiveError

BUILTIN = "megatron_tempnet.adaptive.tasks:mixture_reward"


class RewardFunction:
    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name

    def __call__(self, prompt: str, responses: Sequence[str]) -> List[float]:
        try:
            values = self.fn(prompt, list(responses))
        except Exception as err:  # noqa: BLE001 - any failure of user code becomes a clear error
            raise AdaptiveError(
                f"the reward function {self.name} raised {type(err).__name__}: {err} (prompt {prompt[:80]!r}, "
                f"{len(responses)} responses); fix the function: it must return one finite number per response"
            ) from err
        try:
            values = [v for v in values]
        except TypeError:
            raise AdaptiveError(f"the reward function {self.name} returned {type(values).__name__}, not a list of "
                                f"numbers (prompt {prompt[:80]!r}); return one number per response") from None
        if len(values) != len(responses):
            raise AdaptiveError(f"the reward function {self.name} returned {len(values)} rewards for {len(responses)} "
                                f"responses (prompt {prompt[:80]!r}); return one number per response, in order")
        out = []
        for i, v in enumerate(values):
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise AdaptiveError(f"the reward function {self.name} returned {v!r} for response {i} of prompt "
                                    f"{prompt[:80]!r}, not a number; return one finite number per response") from None
            if not math.isfinite(f):
                raise AdaptiveError(
                    f"the reward function {self.name} returned {f} for response {i} ({responses[i][:60]!r}) of prompt "
                    f"{prompt[:80]!r}; rewards must be finite numbers: score invalid responses with a low finite "
                    "value (e.g. 0 or -1) instead of NaN/inf")
            out.append(f)
        return out


def _import_callable(spec: str) -> Callable:
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise AdaptiveError(f"--reward {spec!r} is neither 'module:function', 'file.py:function' nor a folder; "
                            f"e.g. --reward {BUILTIN}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise AdaptiveError(f"--reward: file {path} not found; pass an existing .py file as FILE.py:function")
            mspec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(mspec)
            mspec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except AdaptiveError:
        raise
    except Exception as err:  # noqa: BLE001
        raise AdaptiveError(f"--reward {spec!r}: cannot import {module_name} ({type(err).__name__}: {err}); check the "
                            "module path (it must be importable from here, or a FILE.py path)") from err
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise AdaptiveError(f"--reward {spec!r}: {module_name} has no callable named {attr!r}")
    return fn


class RewardModel:
    """A sequence-classification reward model (a Hugging Face folder) scoring prompt + response texts."""

    def __init__(self, folder: str, batch_size: int = 16, separator: str = " "):
        try:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError:
            raise AdaptiveError("--reward with a reward model folder needs transformers; `pip install -e .[hf]`, "
                                "or pass a Python reward function as module:function") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        except Exception as err:  # noqa: BLE001
            raise AdaptiveError(f"--reward {folder}: not a loadable sequence-classification reward model "
                                f"({type(err).__name__}: {err}); pass a folder saved with save_pretrained "
                                "(model + tokenizer)") from err
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.torch, self.batch_size, self.separator = torch, batch_size, separator

    def __call__(self, prompt: str, responses: List[str]) -> List[float]:
        texts = [prompt + self.separator + r for r in responses]
        scores: List[float] = []
        with self.torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True, truncation=True)
                logits = self.model(**enc).logits.float()
                s = logits[:, 0] if logits.size(-1) == 1 else self.torch.log_softmax(logits, -1)[:, -1]
                scores.extend(s.tolist())
        return scores


def load_reward(spec: str) -> RewardFunction:
    """A checked reward function from 'module:function', 'file.py:function' or a reward model folder."""
    if not spec:
        raise AdaptiveError(f"no reward: pass --reward module:function (e.g. {BUILTIN}) or a reward model folder")
    if os.path.isdir(spec):
        return RewardFunction(RewardModel(spec), f"reward model {spec}")
    return RewardFunction(_import_callable(spec), spec)
