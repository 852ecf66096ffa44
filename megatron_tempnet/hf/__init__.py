"""Hugging Face interop: our checkpoints <-> transformers folders (GPT-2, LLaMA), the tokenizer, and
TempNet's per-token temperatures in transformers' generate (tempnet_processor.py)."""
