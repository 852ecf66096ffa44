"""FP8 and BF16 loss curves of the same model agree: train both from the same seed and data, print one JSON
line with the largest relative difference over the last half of the run (goal: under 2%).

    python examples/gpu/fp8_vs_bf16.py --config examples/configs/gpt_125m.yaml --train-iters 200
"""
import argparse
import json
import os
import sys

import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))


def _run(argv, queue):
    from megatron_tempnet import platform
    from megatron_tempnet.config import load_config
    from megatron_tempnet.training.loop import train

    cfg, _ = load_config(argv)
    queue.put([h["loss"] for h in train(cfg).history if "loss" in h])
    platform.destroy_distributed()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="examples/configs/gpt_125m.yaml")
    p.add_argument("--train-iters", type=int, default=200)
    args = p.parse_args()
    base = ["--config", args.config, "--train-iters", str(args.train_iters), "--precision", "bf16"]
    curves = {}
    ctx = mp.get_context("spawn")
    for name, extra in (("bf16", []), ("fp8", ["--fp8-format", "hybrid"])):
        q = ctx.Queue()
        proc = ctx.Process(target=_run, args=(base + extra, q))
        proc.start()
        curves[name] = q.get()
        proc.join()
    half = len(curves["bf16"]) // 2
    rel = [abs(a - b) / abs(b) for a, b in zip(curves["fp8"][half:], curves["bf16"][half:])]
    print(json.dumps({"steps": len(curves["bf16"]), "max_rel_diff_last_half": round(max(rel), 5),
                      "final_loss_bf16": curves["bf16"][-1], "final_loss_fp8": curves["fp8"][-1],
                      "agree_within_2pct": max(rel) < 0.02}))


if __name__ == "__main__":
    main()
