"""Configurations of the TempNet models in modeling_tempnet.py (self-contained: transformers only).

They are GPT2Config / LlamaConfig with one more entry, `tempnet` (kind, tau_min, tau_max, vocab_size,
hidden_size, input_variant), and the same model_type: without trust_remote_code transformers reads the same
config.json as the plain architecture. tools/convert_to_hf.py copies this file into the converted folder.
"""
from transformers import GPT2Config, LlamaConfig


class TempNetGPT2Config(GPT2Config):
    """GPT2Config plus `tempnet` (a dict, or None for a model without TempNet)."""


class TempNetLlamaConfig(LlamaConfig):
    """LlamaConfig plus `tempnet` (a dict, or None for a model without TempNet)."""


TempNetGPT2Config.register_for_auto_class()
TempNetLlamaConfig.register_for_auto_class()
TEMPNET_CONFIGS = {"gpt2": TempNetGPT2Config, "llama": TempNetLlamaConfig}  # by config.json's model_type
