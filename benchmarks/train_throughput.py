"""Training throughput: tokens/s, TFLOP/s per device and MFU, for the baseline, TempNet with the reference
loss and TempNet with the fused loss; and, on a CPU, the same tiny LLaMA trained by a plain Hugging Face
transformers loop, as a side-by-side ratio. One JSON line per row.

    python benchmarks/train_throughput.py                      # CPU: fp32 rows + the transformers row
    python benchmarks/train_throughput.py --config examples/configs/llama_1b.yaml --precision bf16 --fp8 \
        --steps 20 --warmup 5                                  # one GPU: bf16 and FP8 rows

MFU = tokens/s x FLOPs per token / peak FLOP/s of the device. FLOPs per token (training, forward + backward):
    6 x (dense parameters: attention q,k,v,o + MLP + output layer) + 12 x layers x hidden x seq_length
(megatron_tempnet/models/family.py: ModelFamily.flops_per_token). Peak: dense BF16 by device name (H100/H200: 989 TFLOP/s),
doubled for FP8. On a CPU no peak is known and MFU is not printed.

Any other flag is a training flag applied to every row of our stack (e.g. `--micro-batch-size 8`).
Rows run in this process, single rank (TP = PP = DP = 1), on synthetic tokens, timing `--steps` steps after
`--warmup` steps (median step time). On a CPU the stacks' steps take turns, so that drift on the machine falls on
every row alike (the transformers loop's too); a GPU times one stack after another (four large models do not fit). TempNet's overhead is
reported as its step time over the baseline's with the same loss implementation.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from functools import partial

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def interleaved_step_seconds(step_fns, warmup: int, steps: int) -> list:
    """Wall times [fn][step] of `steps` calls of each step function after `warmup` calls. The functions take
    turns step by step, so that a machine's drift (other load, clocks) falls on every row alike."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for step in step_fns:
        for _ in range(warmup):
            step()
    times = [[] for _ in step_fns]
    for _ in range(steps):
        for step, ts in zip(step_fns, times):
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            ts.append(time.perf_counter() - t0)
    return times


def median_step_seconds(step_fns, warmup: int, steps: int) -> list:
    """Median step time of each step function, interleaved (the median shrugs off the odd slow step)."""
    return [statistics.median(ts) for ts in interleaved_step_seconds(step_fns, warmup, steps)]


def _stack_config(args, tempnet: bool, loss_impl: str, fp8: bool):
    from megatron_tempnet.config import load_config

    argv = ["--config", args.config, "--mock-data", "--train-iters", str(args.steps + args.warmup),
            "--loss-impl", loss_impl, "--eval-interval", "0", "--log-interval", "1000000"]
    if args.vocab_size:
        argv += ["--vocab-size", str(args.vocab_size)]
    argv += ["--tempnet-enabled"] if tempnet else ["--no-tempnet-enabled"]
    if args.precision:
        argv += ["--precision", args.precision]
    if fp8:
        argv += ["--fp8-format", "hybrid"]
    cfg, _ = load_config(argv + args.training_flags)
    return cfg


def build_our_stacks(args, rows: list) -> list:
    """(cfg, model, step function) for each (tempnet, loss_impl, fp8) in rows."""
    from megatron_tempnet.training.loop import build_datasets, data_iterators, setup_run
    from megatron_tempnet.training.step import train_step

    stacks = []
    for tempnet, loss_impl, fp8 in rows:
        cfg = _stack_config(args, tempnet, loss_impl, fp8)
        model, optimizer, scheduler = setup_run(cfg)
        iters = data_iterators(cfg, build_datasets(cfg)[0], 0, len(model))
        stacks.append((cfg, model, partial(train_step, cfg, model, optimizer, scheduler, iters)))
    return stacks


def our_rows(rows: list, stacks: list, seconds: list) -> list:
    """One result row per stack, from its median step time."""
    from megatron_tempnet import runtime
    from megatron_tempnet.training.tracker import peak_flops

    results = []
    for (tempnet, _, fp8), (cfg, model, _), sec in zip(rows, stacks, seconds):
        tokens = cfg.train.global_batch_size * cfg.model.seq_length
        lm = model[0].module
        flops_per_token = lm.family.flops_per_token(lm.dims)
        row = {
            "stack": "megatron-tempnet", "tempnet": tempnet, "loss_impl": model[0].module.loss_impl,
            "precision": "fp8-hybrid" if fp8 else str(model[0].module.config.params_dtype).replace("torch.", ""),
            "device": torch.cuda.get_device_name() if runtime.use_cuda() else "cpu",
            "step_s": round(sec, 5), "tokens_per_s": round(tokens / sec, 1),
            "tflops_per_device": round(tokens / sec * flops_per_token / 1e12, 4),
        }
        peak = peak_flops(fp8)
        if peak:
            row["mfu"] = round(tokens / sec * flops_per_token / peak, 4)
            row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        results.append(row)
    return results


def transformers_loop(args):
    """The same tiny LLaMA in a plain transformers + torch.optim.AdamW loop, same batch and sequence length.
    Returns (step function, tokens per step)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_tempnet.models.registry import model_dims

    cfg = _stack_config(args, tempnet=False, loss_impl="reference", fp8=False)
    m, t = cfg.model, cfg.train
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=model_dims(m).ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads, max_position_embeddings=m.seq_length,
        rms_norm_eps=m.norm_epsilon, tie_word_embeddings=False, attention_bias=False))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    micro = t.global_batch_size // t.micro_batch_size
    g = torch.Generator().manual_seed(0)

    def step():
        opt.zero_grad(set_to_none=True)
        for _ in range(micro):
            ids = torch.randint(0, m.vocab_size, (t.micro_batch_size, m.seq_length + 1), generator=g)
            out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])
            (out.loss / micro).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
        opt.step()

    return step, t.global_batch_size * m.seq_length


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="examples/configs/tiny_llama.yaml")
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--precision", default=None, help="fp32 / bf16 (default: the platform's)")
    p.add_argument("--fp8", action="store_true", help="also FP8 rows (GPU + Transformer Engine)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args, args.training_flags = p.parse_known_args(argv)  # the rest are training flags, e.g. --micro-batch-size 8

    from megatron_tempnet import runtime
    from megatron_tempnet.cli import quiet_megatron_import_warnings

    quiet_megatron_import_warnings()
    specs = [(tempnet, impl, fp8) for fp8 in ([False, True] if args.fp8 else [False])
             for tempnet, impl in ((False, "reference"), (False, "fused"), (True, "reference"), (True, "fused"))]
    if runtime.use_cuda():  # one stack at a time: a GPU holds one large model's training state, not four
        rows = []
        for spec in specs:
            stacks = build_our_stacks(args, [spec])
            torch.cuda.reset_peak_memory_stats()
            rows += our_rows([spec], stacks, median_step_seconds([stacks[0][2]], args.warmup, args.steps))
            print(json.dumps(rows[-1]), flush=True)
            del stacks
            gc.collect()  # free this row's model and optimizer before the next row builds its own
            torch.cuda.empty_cache()
    else:  # all stacks at once, the transformers loop too, their steps interleaved
        stacks = build_our_stacks(args, specs)
        hf_step, hf_tokens = transformers_loop(args)
        *seconds, hf_seconds = median_step_seconds([st[2] for st in stacks] + [hf_step], args.warmup, args.steps)
        rows = our_rows(specs, stacks, seconds)
        for row in rows:
            print(json.dumps(row), flush=True)
    base = {r["loss_impl"]: r["step_s"] for r in rows if not r["tempnet"] and not r["precision"].startswith("fp8")}
    for r in rows:
        if r["tempnet"] and not r["precision"].startswith("fp8"):
            print(json.dumps({"tempnet_overhead": r["loss_impl"],
                              "step_time_over_baseline": round(r["step_s"] / base[r["loss_impl"]] - 1, 4)}))
    if not runtime.use_cuda():
        hf = {"stack": "transformers-loop", "tempnet": False, "loss_impl": "hf", "precision": "float32",
              "device": "cpu", "step_s": round(hf_seconds, 5), "tokens_per_s": round(hf_tokens / hf_seconds, 1)}
        print(json.dumps(hf))
        ours = next(r for r in rows if not r["tempnet"] and r["loss_impl"] == "reference")
        print(json.dumps({"ratio": "megatron-tempnet / transformers-loop tokens/s (baseline, TP=1)",
                          "value": round(ours["tokens_per_s"] / hf["tokens_per_s"], 3)}))
    if args.fp8:
        bf16 = next(r for r in rows if not r["tempnet"] and r["loss_impl"] == "fused" and "fp8" not in r["precision"])
        fp8 = next(r for r in rows if not r["tempnet"] and r["loss_impl"] == "fused" and "fp8" in r["precision"])
        print(json.dumps({"fp8_over_bf16_tokens_per_s": round(fp8["tokens_per_s"] / bf16["tokens_per_s"], 3)}))
    runtime.destroy_distributed()


if __name__ == "__main__":
    main()
