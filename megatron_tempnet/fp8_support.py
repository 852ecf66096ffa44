"""Which FP8 recipes the installed Transformer Engine can run on this GPU, asked once at validation.

megatron-core builds the recipe from TransformerConfig.fp8_recipe (megatron.core.fp8_utils.get_fp8_recipe):
"delayed" -> DelayedScaling, "tensorwise" -> Float8CurrentScaling, "blockwise" -> Float8BlockScaling,
"mxfp8" -> MXFP8BlockScaling. Transformer Engine states what each needs (TE 2.11): delayed and tensorwise a
GPU of compute capability >= 8.9 (Ada; Hopper and later without further conditions), blockwise >= 9.0 with
CUDA >= 12.9, mxfp8 10.x (Blackwell). On a Hopper GPU (H100/H200) that leaves delayed, tensorwise and blockwise.

Nothing here imports Transformer Engine unless it is installed and a GPU is present (on a CPU machine
importing it fails and breaks megatron-core).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from typing import Callable, Dict, Optional, Tuple

from .config_fields import CHOICES

RECIPES = CHOICES["fp8.fp8_recipe"]  # the --fp8-recipe choices
#: megatron-core 0.16.1 declares Transformer Engine >= 2.9, < 2.12.
TE_VERSIONS = ((2, 9), (2, 12))
#: Transformer Engine's public check for each recipe (transformer_engine.pytorch, TE >= 2.x).
_TE_CHECKS = {"delayed": "is_fp8_available", "tensorwise": "is_fp8_available",
              "blockwise": "is_fp8_block_scaling_available", "mxfp8": "is_mxfp8_available"}


def _te_probe() -> Optional[Tuple[str, Tuple[int, int], Dict[str, Tuple[bool, str]]]]:
    """(TE version, GPU compute capability, {recipe: (supported, reason)}), or None where it cannot be told.
    Asked on this rank's own GPU (LOCAL_RANK), so that no rank opens a CUDA context on another's."""
    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
        return None
    import transformer_engine.pytorch as te

    local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    with torch.cuda.device(local):
        support = {}
        for recipe, name in _TE_CHECKS.items():
            fn = getattr(te, name, None)  # a TE without this check: TE itself refuses at the first FP8 step
            ok, reason = fn(return_reason=True) if fn is not None else (True, "")
            support[recipe] = (bool(ok), str(reason))
        capability = torch.cuda.get_device_capability()
    return importlib.metadata.version("transformer-engine"), capability, support


def _version_tuple(version: str) -> Tuple[int, int]:
    major, minor = (version.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def recipe_problem(recipe: str, probe: Optional[Callable] = None) -> Optional[str]:
    """Why `recipe` cannot run with this TE on this GPU, as one line naming the fix; None if it can, or if
    that cannot be told here (no GPU or no TE: validation refuses FP8 there for that reason already)."""
    found = (probe or _te_probe)()
    if found is None:
        return None
    version, capability, support = found
    lo, hi = TE_VERSIONS
    if not lo <= _version_tuple(version) < hi:
        return (f"Transformer Engine {version} is installed but megatron-core 0.16.1 supports {lo[0]}.{lo[1]} <= TE "
                f"< {hi[0]}.{hi[1]}; install transformer-engine 2.11.0 (examples/gpu/README.md)")
    ok, reason = support[recipe]
    if ok:
        return None
    usable = [r for r in RECIPES if r != recipe and support[r][0]]
    fix = f"use --fp8-recipe {' or '.join(usable)}" if usable else "drop --fp8-format (no FP8 recipe runs here)"
    return (f"--fp8-recipe {recipe} cannot run on this GPU (compute capability {capability[0]}.{capability[1]}, "
            f"Transformer Engine {version}): {reason.strip() or 'not supported'}; {fix}")
