"""FP8 and BF16 loss curves of the same model agree: train both from the same seed and data, print one JSON
line with both curves (loss per step) and their largest relative difference: per step, over the last half
(goal: under 2%), and of 10-step means.

    python examples/gpu/fp8_vs_bf16.py --config examples/configs/gpt_125m.yaml --train-iters 200 [--fp8-recipe delayed]
"""
import argparse
import json
import os
import sys

import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))


def _run(argv, queue):
    from megatron_tempnet import runtime
    from megatron_tempnet.config import load_config
    from megatron_tempnet.training.loop import train

    cfg, _ = load_config(argv)
    queue.put([h["loss"] for h in train(cfg).history if "loss" in h])  # one per step
    runtime.destroy_distributed()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="examples/configs/gpt_125m.yaml")
    p.add_argument("--train-iters", type=int, default=200)
    p.add_argument("--fp8-recipe", default="delayed")
    args = p.parse_args()
    base = ["--config", args.config, "--train-iters", str(args.train_iters), "--precision", "bf16"]
    curves = {}
    ctx = mp.get_context("spawn")
    for name, extra in (("bf16", []), ("fp8", ["--fp8-format", "hybrid", "--fp8-recipe", args.fp8_recipe])):
        q = ctx.Queue()
        proc = ctx.Process(target=_run, args=(base + extra, q))
        proc.start()
        curves[name] = q.get()
        proc.join()
    bf16, fp8 = curves["bf16"], curves["fp8"]
    rel = [abs(a - b) / abs(b) for a, b in zip(fp8, bf16)]
    window = 10  # means over 10 steps: the same batches in both runs, less of one step's noise
    means = [[sum(c[i:i + window]) / window for i in range(0, len(c) - window + 1, window)] for c in (fp8, bf16)]
    rel_means = [abs(a - b) / abs(b) for a, b in zip(*means)]
    half = len(rel) // 2
    print(json.dumps({"steps": len(rel), "fp8_recipe": args.fp8_recipe,
                      "max_rel_diff_per_step": round(max(rel), 5), "max_rel_diff_last_half": round(max(rel[half:]), 5),
                      "max_rel_diff_10_step_means": round(max(rel_means), 5),
                      "final_loss_bf16": bf16[-1], "final_loss_fp8": fp8[-1],
                      "agree_within_2pct": max(rel[half:]) < 0.02, "curves": curves}))


if __name__ == "__main__":
    main()
