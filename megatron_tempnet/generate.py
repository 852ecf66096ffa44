"""Sample from one of our checkpoints or a Hugging Face folder, with TempNet's per-token temperatures.

    python -m megatron_tempnet.generate --load runs/llama --prompt "def fib(n):" --max-new-tokens 48 \\
        --top-k 50 --top-p 0.95 --seed 1 --print-tau
    python -m megatron_tempnet.generate --hf hf/llama --prompts-file prompts.txt --greedy

Every next-token distribution is softmax(z / tau / --temperature) with tau TempNet's temperature for
that position (--no-tempnet: tau = 1), then --top-k / --top-p. Our checkpoints (saved at any TP/PP) run
on one process at TP = PP = 1 and re-run the full prefix at every step (no KV cache); Hugging Face folders
use transformers with its KV cache, and TempNet from the folder when it has one.
Output: the prompt and its continuation per prompt; --print-tau adds each generated token with its tau and
the sample's tau mean and std; --json prints one JSON object per prompt instead.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m megatron_tempnet.generate",
                                description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="our checkpoint: a --save folder (its latest) or one iter_N folder")
    src.add_argument("--hf", help="a Hugging Face folder (e.g. written by tools/convert_to_hf.py)")
    p.add_argument("--tokenizer-model", help="tokenizer (default: the checkpoint's, or the HF folder's)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    p.add_argument("--prompts-file", help="a file with one prompt per line")
    p.add_argument("--prompt-ids", action="append", default=[],
                   help="a prompt as space-separated token ids (repeat for a batch; needs no tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (tau does not change the argmax)")
    p.add_argument("--temperature", type=float, default=1.0, help="global factor after TempNet's tau")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--stop-token-id", type=int, action="append", default=[], help="stop a sequence at this id (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's end-of-sequence id")
    p.add_argument("--no-tempnet", action="store_true", help="tau = 1 (the plain LM)")
    p.add_argument("--print-tau", action="store_true", help="list each generated token with its tau")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    return p.parse_args(argv)


def _prompts(args, tokenizer) -> List[List[int]]:
    from .inference.generation import GenerationError

    texts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise GenerationError(f"--prompts-file {path} does not exist")
        texts += [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    ids = []
    if texts:
        if tokenizer is None:
            raise GenerationError("text prompts need a tokenizer: pass --tokenizer-model, or give --prompt-ids")
        ids += [tokenizer.tokenize(t) for t in texts]
    for s in args.prompt_ids:
        try:
            ids.append([int(x) for x in s.replace(",", " ").split()])
        except ValueError:
            raise GenerationError(f"--prompt-ids {s!r} is not a list of integers") from None
    if not ids:
        raise GenerationError("no prompt: pass --prompt TEXT, --prompts-file FILE or --prompt-ids IDS")
    return ids


def _backend(args):
    """(backend, tokenizer or None)"""
    from .data.tokenizer import load_tokenizer
    from .inference.generation import GenerationError, HFBackend, MegatronBackend

    if args.load:
        from .inference.model import load_checkpoint_model

        model, cfg, _ = load_checkpoint_model(args.load)
        tok_path = args.tokenizer_model or cfg.data.tokenizer_model
        tokenizer = load_tokenizer(tok_path) if tok_path and Path(tok_path).exists() else None
        return MegatronBackend(model), tokenizer
    from .hf.io import load_hf_model

    folder = Path(args.hf)
    if not (folder / "config.json").is_file():
        raise GenerationError(f"{folder} is not a Hugging Face model folder (no config.json)")
    model, head = load_hf_model(folder)
    tok_path = args.tokenizer_model or (str(folder) if (folder / "tokenizer.json").is_file()
                                        or (folder / "tokenizer_config.json").is_file() else None)
    tokenizer = load_tokenizer(tok_path) if tok_path else None
    return HFBackend(model, head), tokenizer


def run(args) -> list:
    from .inference.generation import SamplingParams, generate

    backend, tokenizer = _backend(args)
    prompts = _prompts(args, tokenizer)
    stop = list(args.stop_token_id)
    if tokenizer is not None and not args.ignore_eos:
        try:
            if tokenizer.eos is not None and tokenizer.eos >= 0:
                stop.append(int(tokenizer.eos))
        except Exception:  # a tokenizer without an end-of-sequence token
            pass
    params = SamplingParams(max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_token_ids=stop,
                            use_tempnet=not args.no_tempnet)
    results = generate(backend, prompts, params)
    records = []
    for r in results:
        rec = {"prompt_ids": r.prompt_ids, "token_ids": r.token_ids, "finish_reason": r.finish_reason,
               "taus": r.taus if backend.has_tempnet and not args.no_tempnet else None}
        if tokenizer is not None:
            rec["prompt"] = tokenizer.detokenize(r.prompt_ids)
            rec["completion"] = tokenizer.detokenize(r.token_ids)
            rec["pieces"] = [tokenizer.id_to_piece(t) for t in r.token_ids]
        records.append(rec)
    return records


def _print(records, args) -> None:
    for i, rec in enumerate(records):
        if args.json:
            print(json.dumps(rec, ensure_ascii=False))
            continue
        print(f"=== prompt {i} ({len(rec['prompt_ids'])} tokens, {len(rec['token_ids'])} generated, "
              f"{rec['finish_reason']}) ===")
        if "completion" in rec:
            print(rec["prompt"] + rec["completion"])
        else:
            print(" ".join(map(str, rec["prompt_ids"])) + " | " + " ".join(map(str, rec["token_ids"])))
        if args.print_tau:
            taus = rec["taus"] or [None] * len(rec["token_ids"])
            pieces = rec.get("pieces") or [""] * len(rec["token_ids"])
            print("  step  token_id  tau      piece")
            for j, (t, tau, piece) in enumerate(zip(rec["token_ids"], taus, pieces)):
                tau_s = f"{tau:.4f}" if tau is not None else "1 (no TempNet)"
                print(f"  {j:4d}  {t:8d}  {tau_s:7s}  {piece!r}")
            if rec["taus"]:
                print(f"  {tau_summary(rec['taus'])}")


def tau_summary(taus: List[float]) -> str:
    """One line on a sample's per-token temperatures: how much TempNet varies them."""
    n = len(taus)
    mean = sum(taus) / n
    std = (sum((t - mean) ** 2 for t in taus) / n) ** 0.5
    return f"tau over {n} generated tokens: mean {mean:.4f}, std {std:.4f}, min {min(taus):.4f}, max {max(taus):.4f}"


def main(argv: Optional[list] = None) -> int:
    from .cli import quiet_megatron_import_warnings

    quiet_megatron_import_warnings()
    import warnings

    warnings.filterwarnings("ignore")
    from . import runtime
    from .config import ConfigError
    from .data.tokenizer import TokenizerError
    from .inference.generation import GenerationError

    args = parse_args(argv)
    try:
        _print(run(args), args)
    except (ConfigError, TokenizerError, GenerationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        runtime.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
