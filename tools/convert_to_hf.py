#!/usr/bin/env python
"""Convert between our checkpoints and Hugging Face transformers folders.

    # ours (a save folder or one iter_N folder, saved at any TP/PP) -> Hugging Face
    python tools/convert_to_hf.py --load runs/llama --out hf/llama [--tokenizer-model tok.model] [--dtype bf16]

    # a Hugging Face LLaMA, GPT-2 or Qwen2 folder -> a model-only checkpoint of ours, to finetune or to give a TempNet:
    python tools/convert_to_hf.py --from-hf hf/llama --out ckpt/llama
    python -m megatron_tempnet.train ... --pretrained-checkpoint ckpt/llama --mode frozen_lm --tempnet-enabled

GPT -> GPT2LMHeadModel, LLaMA -> LlamaForCausalLM, Qwen2 -> Qwen2ForCausalLM, weights as safetensors, the
tokenizer (tokenizer.json built from the sentencepiece model, plus the .model itself). With TempNet (any
family) the folder holds the TempNet model (modeling_tempnet.py and the files it imports, auto_map in
config.json): loaded with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` (or through `pipeline`), its `generate`
samples with TempNet's per-token temperatures like `python -m megatron_tempnet.generate`; loaded without
trust_remote_code it is the plain GPT-2 / LLaMA / Qwen2, which samples at tau = 1. Runs in one CPU process; no torchrun
(export starts no process group).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_tempnet.cli_help import HelpFormatter  # noqa: E402  (after the path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", metavar="DIR",
                     help="our checkpoint to export: a --save folder (its latest) or one iter_N folder (this or --from-hf "
                          "is required)")
    src.add_argument("--from-hf", metavar="HF_DIR",
                     help="a Hugging Face LLaMA, GPT-2 or Qwen2 folder to convert into our checkpoint format")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder; new or empty (required)")
    p.add_argument("--tokenizer-model", metavar="PATH",
                   help="tokenizer to ship with --load (default: the one the run was trained with)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="dtype of the LM's weights in the Hugging Face folder; TempNet stays fp32 (default: fp32)")
    p.add_argument("--overwrite", action="store_true",
                   help="with --load, write into a non-empty --out (default: refuse)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return parser().parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)  # first: --help and flag errors need no torch
    from megatron_tempnet.cli import quiet_megatron_import_warnings

    quiet_megatron_import_warnings()
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_tempnet import runtime
    from megatron_tempnet.config import ConfigError
    from megatron_tempnet.data.tokenizer import TokenizerError
    from megatron_tempnet.hf.convert import ConversionError
    from megatron_tempnet.hf.io import export_to_hf, import_from_hf

    try:
        if args.load:
            out = export_to_hf(args.load, args.out, tokenizer_model=args.tokenizer_model, dtype=args.dtype,
                               overwrite=args.overwrite)
            print(f"wrote Hugging Face folder {out}")
        else:
            out = import_from_hf(args.from_hf, args.out)
            print(f"wrote checkpoint {out} (model weights only: start runs with --pretrained-checkpoint {out})")
    except (ConfigError, TokenizerError, ConversionError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        runtime.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
