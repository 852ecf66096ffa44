"""Hugging Face interop: our checkpoints <-> transformers folders (GPT-2, LLaMA), the tokenizer, and TempNet
in transformers: modeling_tempnet.py (with configuration_tempnet.py and tempnet_processor.py), the remote-code
model whose generate applies TempNet's per-token temperatures."""
