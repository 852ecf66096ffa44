"""Configurations of the TempNet models in modeling_tempnet.py (self-contained: transformers only).

`TempNet<Base>` for a transformers config class `<Base>` (TempNetGPT2Config, TempNetLlamaConfig,
TempNetQwen2Config, ...) is `<Base>` with one more entry, `tempnet` (kind, tau_min, tau_max, vocab_size,
hidden_size, input_variant), and the same model_type: without trust_remote_code transformers reads the same
config.json as the plain architecture. The classes are made on first use, for whatever model_type the folder
has (`tempnet_config_class`), and are also this module's attributes of those names, which is how transformers
finds the class config.json's auto_map names. tools/convert_to_hf.py copies this file into the converted folder.
"""
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

PREFIX = "TempNet"
_MADE: dict = {}  # class name -> class


def tempnet_config_class(model_type: str) -> type:
    """TempNet's config class for config.json's `model_type` (KeyError: transformers has no such type)."""
    base_name = CONFIG_MAPPING_NAMES[model_type]
    name = PREFIX + base_name
    if name not in _MADE:
        base = getattr(transformers, base_name)
        cls = type(name, (base,), {"__module__": __name__,
                                   "__doc__": f"{base_name} plus `tempnet` (a dict, or None for a model without TempNet)."})
        cls.register_for_auto_class()
        _MADE[name] = cls
    return _MADE[name]


def __getattr__(name: str) -> type:
    """TempNet<Base> by name, made on first use (PEP 562: called for names the module does not define)."""
    base = getattr(transformers, name[len(PREFIX):], None) if name.startswith(PREFIX) else None
    if base is None or name[len(PREFIX):] not in CONFIG_MAPPING_NAMES.values():
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return tempnet_config_class(base.model_type)
