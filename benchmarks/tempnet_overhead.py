"""Where TempNet's per-step time goes: the training step with TempNet taken apart, fused loss, single rank.

    python benchmarks/tempnet_overhead.py                  # tiny LLaMA on a CPU, 100 interleaved steps

Four stacks of the same config train side by side, their steps taking turns:

    baseline       TempNet off (tau = 1, no temperature anywhere)
    constant_tau   tau = 1 as a tensor that needs a gradient: the loss forms dL/dtau, the step reports temperature
                   statistics; TempNet's parameters are in the model, the optimizer and the grad norm, but TempNet
                   computes nothing
    forward_only   TempNet computes tau without an autograd graph: no backward through TempNet, no gradient to
                   its parameters
    tempnet        TempNet as trained

Each row's cost is the median over steps of (its step time / the baseline's step time of the same round) - 1,
which cancels the machine's drift between rounds. The differences split TempNet's overhead into carrying a
learned temperature (constant_tau), TempNet's forward (forward_only - constant_tau) and its backward with the
gradients to its parameters (tempnet - forward_only). The middle rows replace TempNet's forward on their model
instance; they measure, they do not train anything meaningful. One JSON line per row, then the split.
All four stacks are alive at once: meant for small configs (on a GPU, configs whose four training states fit).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_throughput import build_our_stacks, interleaved_step_seconds  # noqa: E402

ROWS = ("baseline", "constant_tau", "forward_only", "tempnet")


def _constant_tau(hidden: torch.Tensor, output_weight: torch.Tensor, logit_max=None) -> torch.Tensor:
    return torch.ones(hidden.shape[:-1], dtype=torch.float32, device=hidden.device, requires_grad=True)


def _without_graph(forward):
    def forward_only(hidden, output_weight, logit_max=None):
        with torch.no_grad():
            return forward(hidden, output_weight, logit_max)
    return forward_only


def build_rows(args) -> list:
    """(name, model, step function) for each row of ROWS."""
    from megatron_tempnet.models.build import unwrap

    stacks = build_our_stacks(args, [(name != "baseline", "fused", False) for name in ROWS])
    rows = []
    for name, (_, model, step) in zip(ROWS, stacks):
        tempnet = unwrap(model[0]).tempnet
        if name == "constant_tau":
            tempnet.forward_from_hidden = _constant_tau
        elif name == "forward_only":
            tempnet.forward_from_hidden = _without_graph(tempnet.forward_from_hidden)
        rows.append((name, model, step))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="examples/configs/tiny_llama.yaml")
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=3)
    args, args.training_flags = p.parse_known_args(argv)  # the rest are training flags for every row
    args.precision = None

    from megatron_tempnet import runtime
    from megatron_tempnet.cli import quiet_megatron_import_warnings

    quiet_megatron_import_warnings()
    rows = build_rows(args)
    times = interleaved_step_seconds([step for _, _, step in rows], args.warmup, args.steps)
    cost = {}
    for (name, _, _), ts in zip(rows, times):
        cost[name] = statistics.median(t / b - 1 for t, b in zip(ts, times[0]))
        print(json.dumps({"row": name, "step_s": round(statistics.median(ts), 5),
                          "over_baseline": round(cost[name], 4)}), flush=True)
    print(json.dumps({"tempnet_overhead_split": {
        "carrying_a_temperature": round(cost["constant_tau"], 4),
        "tempnet_forward": round(cost["forward_only"] - cost["constant_tau"], 4),
        "tempnet_backward": round(cost["tempnet"] - cost["forward_only"], 4),
        "total": round(cost["tempnet"], 4)}}))
    runtime.destroy_distributed()


if __name__ == "__main__":
    main()
