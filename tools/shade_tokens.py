#!/usr/bin/env python
r"""Shade a generated text by the temperature of each token: HTML and PNG.

From a JSON file of tokens and temperatures (null for prompt tokens):

    python tools/shade_tokens.py --input gen.json --html gen.html --png gen.png
    # gen.json: {"tokens": ["<copy>", " s3", ...], "temperatures": [null, 0.2, ...]}

Or generate first (megatron_tempnet.generate's sampling), from one of our checkpoints or a Hugging Face
folder written by tools/convert_to_hf.py, each token shaded by the temperature it was sampled at
(TempNet's tau, times --temperature):

    python tools/shade_tokens.py --load runs/tiny --prompt "def main(" --max-new-tokens 60 \
        --html out.html --png out.png
    python tools/shade_tokens.py --hf hf/tiny --prompt "def main(" --max-new-tokens 60 --html out.html

or by an Adaptive Decoder head's choices (our checkpoints):

    python tools/shade_tokens.py --load runs/ad/lm --task-mixture --head runs/ad \
        --prompt "<name> s3 <sep>" --html out.html --png out.png --save-json out.json

The colour scale runs from --vmin (blue, cold) to --vmax (red, hot); by default from the lowest to the
highest temperature shown (with --head: the head's temperature set). The prompt is drawn grey.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_tempnet.cli_help import HelpFormatter  # noqa: E402  (after the path)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=HelpFormatter)
    src = p.add_argument_group("input (one of)")
    src.add_argument("--input", help="JSON file with 'tokens' (strings) and 'temperatures' (numbers; null = prompt)")
    src.add_argument("--load", help="generate from our checkpoint (a save folder or an iter_N folder)")
    src.add_argument("--hf", help="generate from a Hugging Face folder (tools/convert_to_hf.py)")
    g = p.add_argument_group("generation (with --load or --hf)")
    g.add_argument("--prompt", action="append", help="prompt text (repeat for several; each gets its own picture)")
    g.add_argument("--tokenizer-model", help="tokenizer (default: the checkpoint's or the folder's)")
    g.add_argument("--task-mixture", action="store_true", help="--load is an LM of the built-in task mixture")
    g.add_argument("--head", help="an Adaptive Decoder head folder (tools/train_adaptive_decoder.py --save), "
                                  "with --load (unset: TempNet's temperatures)")
    g.add_argument("--latent", choices=("argmax", "sample"), default="argmax", help="how the head picks")
    g.add_argument("--temperature", type=float, default=1.0, help="global factor after TempNet's tau")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens whose probabilities "
                   "sum to p (1: all)")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    o = p.add_argument_group("output")
    o.add_argument("--html", help="write the HTML page here")
    o.add_argument("--png", help="write the PNG picture here (needs Pillow)")
    o.add_argument("--save-json", help="also write the tokens and temperatures as JSON (the --input format)")
    o.add_argument("--vmin", type=float, help="temperature at the cold end of the colour scale (unset: the lowest "
                   "shown)")
    o.add_argument("--vmax", type=float, help="temperature at the hot end of the colour scale (unset: the highest "
                   "shown)")
    o.add_argument("--width", type=int, default=800, help="PNG width in pixels")
    o.add_argument("--font-size", type=int, default=16, help="font size in pixels")
    o.add_argument("--title", default="Temperature per token", help="title of the page and the picture")
    return p


def _from_json(path: str):
    from megatron_tempnet.adaptive.lm import AdaptiveError

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise AdaptiveError(f"--input {path}: cannot read it as JSON ({err}); pass a file like "
                            '{"tokens": ["a", "b"], "temperatures": [null, 0.7]}') from None
    if not isinstance(data, dict) or "tokens" not in data or "temperatures" not in data:
        raise AdaptiveError(f"--input {path} must be a JSON object with 'tokens' and 'temperatures' lists")
    return [str(t) for t in data["tokens"]], data["temperatures"], data.get("vmin"), data.get("vmax")


def _generate_tempnet(args):
    """(tokens, temperatures, vmin, vmax) per prompt, sampled by megatron_tempnet.generate (our checkpoint or a
    Hugging Face folder): each generated token's temperature is TempNet's tau times --temperature."""
    from megatron_tempnet.adaptive.shade import piece_text
    from megatron_tempnet.generate import parse_args, run

    argv = ["--load", args.load] if args.load else ["--hf", args.hf]
    if args.tokenizer_model:
        argv += ["--tokenizer-model", args.tokenizer_model]
    for p in args.prompt:
        argv += ["--prompt", p]
    argv += ["--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed), "--temperature",
             str(args.temperature), "--top-k", str(args.top_k), "--top-p", str(args.top_p)]
    out = []
    for rec in run(parse_args(argv)):
        if "pieces" not in rec:
            from megatron_tempnet.adaptive.lm import AdaptiveError

            raise AdaptiveError("the model has no tokenizer here to show the text; pass --tokenizer-model")
        taus = rec["taus"] or [1.0] * len(rec["token_ids"])
        pieces = [piece_text(t) for t in rec["pieces"]]
        out.append(([rec["prompt"]] + pieces, [None] + [t * args.temperature for t in taus], None, None))
    return out


def _generate_head(args):
    """(tokens, temperatures, vmin, vmax) per prompt, the temperatures chosen by an Adaptive Decoder head."""
    import torch

    from megatron_tempnet.adaptive.head import AdaptiveDecoderHead
    from megatron_tempnet.adaptive.lm import AdaptiveError, LanguageModel
    from megatron_tempnet.adaptive.sampling import generate
    from megatron_tempnet.adaptive.shade import token_strings

    if not args.load:
        raise AdaptiveError("--head needs --load (our checkpoint of the LM the head was trained on)")
    tokenizer = None
    if args.task_mixture:
        from megatron_tempnet.adaptive.tasks import MixtureTokenizer

        tokenizer = MixtureTokenizer()
    elif args.tokenizer_model:
        from megatron_tempnet.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer_model)
    lm = LanguageModel.from_checkpoint(args.load, tokenizer)
    head = AdaptiveDecoderHead.load(args.head)
    if head.hidden_size != lm.hidden_size:
        raise AdaptiveError(f"the head reads hidden states of size {head.hidden_size}, the LM's are {lm.hidden_size}: "
                            "pass the LM the head was trained on")
    temps = head.temperatures.tolist()
    ids = [lm.tokenizer.tokenize(p) for p in args.prompt]
    gen = torch.Generator().manual_seed(args.seed)
    out = []
    for p, r in zip(ids, generate(lm, ids, head, max_new_tokens=args.max_new_tokens, generator=gen,
                                  latent=args.latent)):
        sep = " " if args.task_mixture else ""
        tokens = [lm.tokenizer.detokenize(p)] + [sep + t for t in token_strings(lm.tokenizer, r.tokens)]
        out.append((tokens, [None] + r.temperatures, min(temps), max(temps)))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from megatron_tempnet.adaptive.lm import AdaptiveError
    from megatron_tempnet.adaptive.shade import render_html, render_png
    from megatron_tempnet.config import ConfigError
    from megatron_tempnet.cli import quiet_megatron_import_warnings
    from megatron_tempnet.data.tokenizer import TokenizerError
    from megatron_tempnet.inference.generation import GenerationError

    quiet_megatron_import_warnings()

    try:
        if sum(map(bool, (args.input, args.load, args.hf))) != 1:
            raise AdaptiveError("pass exactly one of --input FILE.json, --load CHECKPOINT and --hf FOLDER")
        if (args.load or args.hf) and not args.prompt:
            raise AdaptiveError("--load / --hf need --prompt TEXT (the text to continue)")
        if not args.html and not args.png and not args.save_json:
            raise AdaptiveError("nothing to write: pass --html FILE and/or --png FILE")
        if args.input:
            items = [_from_json(args.input)]
        else:
            items = _generate_head(args) if args.head else _generate_tempnet(args)
        for n, (tokens, temps, vmin, vmax) in enumerate(items):
            vmin = args.vmin if args.vmin is not None else vmin
            vmax = args.vmax if args.vmax is not None else vmax
            suffix = "" if len(items) == 1 else f".{n}"

            def name(path):
                root, ext = os.path.splitext(path)
                return root + suffix + ext

            if args.save_json:
                with open(name(args.save_json), "w", encoding="utf-8") as f:
                    json.dump({"tokens": tokens, "temperatures": temps, "vmin": vmin, "vmax": vmax}, f)
            if args.html:
                render_html(tokens, temps, name(args.html), vmin=vmin, vmax=vmax, title=args.title)
                print(f"wrote {name(args.html)} ({len(tokens)} tokens)")
            if args.png:
                img, _ = render_png(tokens, temps, name(args.png), vmin=vmin, vmax=vmax, width=args.width,
                                    font_size=args.font_size, title=args.title)
                print(f"wrote {name(args.png)} ({img.width} x {img.height} px)")
    except (ConfigError, GenerationError, TokenizerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if args.load or args.hf:
            from megatron_tempnet import runtime

            runtime.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
