"""The model families by the name `--arch` gives them: the one place that looks a family up.

A new family is a folder models/<name>/ whose __init__.py defines FAMILY (a models.family.ModelFamily) and one
line below. Everything else asks the family (get_family) or its sizes (model_dims) instead of the name.
"""
from __future__ import annotations

from typing import Dict, Tuple

from ..config import ConfigError, ModelConfig
from .family import ModelDims, ModelFamily
from .gpt import FAMILY as GPT
from .llama import FAMILY as LLAMA
from .qwen2 import FAMILY as QWEN2

FAMILIES: Dict[str, ModelFamily] = {family.name: family for family in (GPT, LLAMA, QWEN2)}


def family_names() -> Tuple[str, ...]:
    """The values --arch takes."""
    return tuple(FAMILIES)


def get_family(arch: str) -> ModelFamily:
    """The family named `arch`; a ConfigError naming the registered ones for any other name."""
    try:
        return FAMILIES[arch]
    except KeyError:
        raise ConfigError(f"--arch must be one of {', '.join(FAMILIES)}; got {arch!r}") from None


def model_dims(m: ModelConfig) -> ModelDims:
    """The sizes of the model `m` describes (its family's reading of it)."""
    return get_family(m.arch).dims(m)
