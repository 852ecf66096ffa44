#!/usr/bin/env python
r"""Attention transfer for language models: how much of a teacher do its attention maps carry?

    python benchmarks/attention_transfer.py                  # GPT on the embedded corpus, CPU, under an hour
    python benchmarks/attention_transfer.py --arch llama
    python benchmarks/attention_transfer.py --scale test     # seconds; for the test-suite

Li et al. 2024 ("On the Surprising Effectiveness of Attention Transfer for Vision Transformers") train a ViT
student from a pretrained teacher's attention maps only, and recover most of the teacher's accuracy. This is the
same experiment for a small causal LM, with the stack's --attention-transfer-mode (megatron_tempnet/models/
attention_transfer.py):

  teacher   trained from scratch for --teacher-iters steps, then saved (a checkpoint of ours)
  scratch   student trained from scratch (no teacher)
  copy      student that uses the teacher's attention probabilities in every layer (it learns values, MLPs,
            embeddings; its q/k projections get no gradient), at training AND evaluation time
  distill   student with its own attention, trained on LM loss + w * mean KL(teacher || student) over layers,
            heads and tokens (w = --distill-weight)

The three students share everything but the mode: shape, initial weights (same seed), data order, step budget
(--student-iters) and learning-rate schedule. The teacher has the students' shape and another seed.

Data: the embedded corpus (the Python standard library's .py files) with 5% of the FILES held out by a hash of
their path (megatron_tempnet.data.corpus.prepare_stdlib_dataset: sentencepiece tokenizer trained on the training
files, indexed dataset). Held-out perplexity: the held-out tokens cut into consecutive windows of seq_length + 1,
of which --eval-windows (default 512, i.e. 65k tokens; 0 = all 2.8k) evenly spread ones are evaluated through the
trainer's own evaluation path (training/step.py: evaluate; the copy student gets the teacher's maps there too).
Curves: the same metric on a fixed, evenly spread subset of 64 windows every --eval-interval steps. Nothing held
out is used for any choice.

Output: one JSON line per run on stdout and in <prefix>.jsonl, a markdown table with the command (<prefix>.md) and
the curves (<prefix>.png). Default prefix: benchmarks/results/attention_transfer. Each run trains in a fresh
process (megatron-core's process groups are global state) on a 1-rank gloo group (TP = PP = 1).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform as py_platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from benchmarks._shared import (  # noqa: E402
    git_commit, heldout_windows, single_rank_worker, spread_subset, train_dataset)

DEFAULT_OUTPUT_PREFIX = os.path.join(REPO, "benchmarks", "results", "attention_transfer")
DEFAULT_WORK_DIR = os.path.join(REPO, "runs", "attention_transfer")
STUDENTS = ("scratch", "copy", "distill")
LABELS = {"teacher": "teacher", "scratch": "student from scratch", "copy": "student, attention copy",
          "distill": "student, attention distillation"}

SCALES = {
    # About 15 CPU-minutes at one thread per run (teacher 1200 steps, then three students of 400 steps side by
    # side): ~10 min on 2 idle cores; on a shared machine the wall time grows with the load.
    "cpu-small": dict(num_layers=4, hidden_size=128, num_attention_heads=4, seq_length=128, micro_batch_size=16,
                      global_batch_size=16, vocab_size=4096, teacher_iters=1200, student_iters=400, lr=2e-3,
                      min_lr=2e-4, lr_warmup_iters=20, eval_interval=25, curve_windows=64, eval_windows=512),
    "test": dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, micro_batch_size=2,
                 global_batch_size=4, vocab_size=250, teacher_iters=4, student_iters=3, lr=1e-2, min_lr=1e-3,
                 lr_warmup_iters=1, eval_interval=2, curve_windows=8, eval_windows=16),
}


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------

def prepare_data(args, s: dict) -> dict:
    if args.mock_data:
        return {"mock": True, "vocab_size": s["vocab_size"], "description": "synthetic tokens (MockTokens)"}
    from megatron_tempnet.data.corpus import prepare_stdlib_dataset

    out_dir = os.path.join(args.work_dir, f"data_stdlib_v{s['vocab_size']}_h0.05")
    prep = prepare_stdlib_dataset(out_dir, vocab_size=s["vocab_size"], holdout_fraction=0.05, workers=0)
    return {"train": prep["data_path"], "heldout": prep["heldout_data_path"], "tokenizer": prep["tokenizer"],
            "vocab_size": prep["vocab_size"], "train_tokens": prep["tokens"],
            "description": "embedded corpus (this Python's standard library .py files, tests excluded), 5% of the "
                           "files held out by path hash; sentencepiece BPE trained on the training files"}


class Windows:
    """Map-style dataset of held-out windows in the trainer's item format."""

    def __init__(self, windows):
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.size(0)

    def __getitem__(self, i: int) -> dict:
        import torch

        w = self.windows[i]
        return {"tokens": w[:-1], "labels": w[1:], "loss_mask": torch.ones(w.numel() - 1)}


# ---------------------------------------------------------------------------------------------------------------
# One run (in a fresh process)
# ---------------------------------------------------------------------------------------------------------------

def run_flags(run: str, s: dict, data: dict, teacher_dir: str) -> List[str]:
    """The trainer's flags for one run: shared shape and schedule; the teacher its own seed and budget."""
    iters = s["teacher_iters"] if run == "teacher" else s["student_iters"]
    flags = [
        "--arch", s["arch"], "--num-layers", str(s["num_layers"]), "--hidden-size", str(s["hidden_size"]),
        "--num-attention-heads", str(s["num_attention_heads"]), "--seq-length", str(s["seq_length"]),
        "--micro-batch-size", str(s["micro_batch_size"]), "--global-batch-size", str(s["global_batch_size"]),
        "--train-iters", str(iters), "--lr", repr(s["lr"]), "--min-lr", repr(s["min_lr"]),
        "--lr-warmup-iters", str(s["lr_warmup_iters"]), "--lr-decay-style", "cosine", "--eval-interval", "0",
        "--log-interval", "1000000000", "--no-tempnet-enabled", "--seed", str(s["teacher_seed"] if run == "teacher"
                                                                               else s["student_seed"]),
    ]
    if s["arch"] == "llama":
        flags += ["--num-query-groups", str(max(1, s["num_attention_heads"] // 2))]
    if data.get("mock"):
        flags += ["--mock-data", "--vocab-size", str(s["vocab_size"])]
    else:
        flags += ["--data-path", *data["train"], "--tokenizer-model", data["tokenizer"], "--split", "100,0,0"]
    if run == "teacher":
        flags += ["--save", teacher_dir, "--keep-last", "1"]
    elif run in ("copy", "distill"):
        flags += ["--attention-transfer-mode", run, "--attention-transfer-teacher-checkpoint", teacher_dir,
                  "--attention-transfer-distill-weight", repr(s["distill_weight"])]
    return flags


def train_run(spec: dict) -> dict:
    """Train one run and evaluate it on the held-out windows (needs RANK/WORLD_SIZE/MASTER_* set)."""
    import torch

    from megatron_tempnet.config import load_config
    from megatron_tempnet.finalize import resolve
    from megatron_tempnet.training.checkpointing import save_checkpoint
    from megatron_tempnet.training.loop import data_iterators, setup_run
    from megatron_tempnet.training.step import evaluate, train_step

    s, data, run = spec["settings"], spec["data"], spec["run"]
    cfg, _ = load_config(run_flags(run, s, data, spec["teacher_dir"]))
    cfg.data.data_cache_path = spec.get("cache_dir")
    cfg = resolve(cfg).cfg  # the vocabulary from the tokenizer, the optimizer choice
    t0 = time.perf_counter()
    model, optimizer, scheduler = setup_run(cfg)
    windows = heldout_windows(data, cfg.model.seq_length, cfg.model.vocab_size)
    if s.get("eval_windows"):
        windows = spread_subset(windows, s["eval_windows"])
    gbs = cfg.train.global_batch_size
    windows = windows[: (windows.size(0) // gbs) * gbs]  # whole global batches
    curve_windows = spread_subset(windows, s["curve_windows"])
    iters = data_iterators(cfg, train_dataset(cfg, shuffle_seed=1234), 0, 1)  # the same order for every run
    setup_s = time.perf_counter() - t0

    def heldout(w) -> dict:
        return evaluate(cfg, model, data_iterators(cfg, Windows(w), 0, 1), w.size(0) // gbs)

    losses, kls, curve, step_times = [], [], [], []
    eval_s = 0.0
    cpu0 = time.process_time()
    for it in range(1, cfg.train.train_iters + 1):
        t1 = time.perf_counter()
        m = train_step(cfg, model, optimizer, scheduler, iters)
        step_times.append(time.perf_counter() - t1)
        losses.append(m["loss"])
        kls.append(m.get("attn_kl"))
        if it % s["eval_interval"] == 0 or it == cfg.train.train_iters:
            t2 = time.perf_counter()
            ev = heldout(curve_windows)
            eval_s += time.perf_counter() - t2
            recent = losses[-s["eval_interval"]:]
            curve.append({"iteration": it, "ppl": ev["ppl"], "attn_kl": ev.get("attn_kl"),
                          "train_loss": sum(recent) / len(recent)})
            kl = f" | held-out attention KL {ev['attn_kl']:.4f}" if "attn_kl" in ev else ""
            print(f"[{run}] iter {it} | train loss {curve[-1]['train_loss']:.3f} | held-out ppl {ev['ppl']:.2f}{kl}"
                  f" | {statistics.median(step_times[-s['eval_interval']:]):.3f} s/step", flush=True)
    t3 = time.perf_counter()
    final = heldout(windows)
    eval_s += time.perf_counter() - t3
    cpu_s = time.process_time() - cpu0
    if run == "teacher":
        save_checkpoint(cfg, cfg.train.train_iters, cfg.train.train_iters * gbs, model, optimizer, scheduler)
    return {
        "run": run, "arch": s["arch"], "scale": s["scale"], "train_iters": cfg.train.train_iters,
        "tokens_seen": cfg.train.train_iters * gbs * cfg.model.seq_length,
        "heldout_tokens": int(final["tokens"]), "heldout_ppl": final["ppl"], "heldout_ce": final["ce"],
        "heldout_attn_kl": final.get("attn_kl"), "final_train_loss": losses[-1],
        "setup_s": round(setup_s, 1), "train_s": round(sum(step_times), 1), "eval_s": round(eval_s, 1),
        "cpu_s": round(cpu_s, 1), "threads": torch.get_num_threads(),
        "median_step_s": round(statistics.median(step_times), 4), "curve": curve, "losses": losses,
        "train_attn_kl": kls if run == "distill" else None,
    }


def run_in_processes(specs: List[dict], tmp: str, jobs: int, threads: Optional[int] = None) -> List[dict]:
    """Each spec in a fresh process, `jobs` at a time, each with `threads` torch threads (default: its share of
    the CPU cores)."""
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    pending, running, done = list(specs), [], {}
    while pending or running:
        while pending and len(running) < jobs:
            spec = {**pending.pop(0), "threads": threads}
            spec_path, out_path = (os.path.join(tmp, f"{spec['run']}.spec.json"), os.path.join(tmp, f"{spec['run']}.json"))
            with open(spec_path, "w") as f:
                json.dump(spec, f)
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", spec_path, out_path]
            running.append((spec["run"], out_path, subprocess.Popen(cmd, cwd=REPO)))
        time.sleep(1)
        for item in list(running):
            run, out_path, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0 or not os.path.isfile(out_path):
                for _, _, other in running:
                    other.terminate()
                raise SystemExit(f"run {run} failed (exit status {proc.returncode})")
            with open(out_path) as f:
                done[run] = json.load(f)
    return [done[spec["run"]] for spec in specs]


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

def recovered(row: dict, scratch: dict, teacher: dict) -> Optional[float]:
    """Share of the teacher's advantage over the scratch student (in held-out cross-entropy) the run recovers."""
    gap = scratch["heldout_ce"] - teacher["heldout_ce"]
    return (scratch["heldout_ce"] - row["heldout_ce"]) / gap if gap > 0 else None


def summarize(rows: List[dict], meta: dict) -> str:
    by = {r["run"]: r for r in rows}
    s = meta["settings"]
    lines = [f"# Attention transfer ({s['arch']}, scale {s['scale']}): held-out perplexity", "",
             f"Command: `{meta['command']}`", "",
             "| run | steps | held-out ppl | held-out CE (nats) | share of teacher's gain recovered | "
             "held-out attention KL | wall s (train) | CPU s (run) |", "|---|---|---|---|---|---|---|---|"]
    for run in ("teacher",) + STUDENTS:
        if run not in by:
            continue
        r = by[run]
        rec = recovered(r, by["scratch"], by["teacher"]) if {"scratch", "teacher"} <= by.keys() else None
        kl = f"{r['heldout_attn_kl']:.4f}" if r.get("heldout_attn_kl") is not None else "-"
        lines.append(f"| {LABELS[run]} | {r['train_iters']} | {r['heldout_ppl']:.2f} | {r['heldout_ce']:.4f} | "
                     f"{'-' if rec is None or run in ('teacher', 'scratch') else f'{100 * rec:.0f}%'} | {kl} | "
                     f"{r['train_s']:.0f} | {r['cpu_s']:.0f} |")
    lines += ["", "Share recovered = (CE_scratch - CE_run) / (CE_scratch - CE_teacher): 0% is no better than training "
              "from scratch for the same steps, 100% is the teacher. The copy student uses the teacher's attention "
              "maps at evaluation too (it cannot run without the teacher); the distill student is a standalone model. "
              "Attention KL: mean over layers, heads and tokens of KL(teacher || student), distill only.", "",
              "## Setup", "",
              f"- Model: {s['arch']}, {s['num_layers']} layers, hidden {s['hidden_size']}, {s['num_attention_heads']} "
              f"heads, sequence {s['seq_length']}, vocabulary {meta['vocab_size']}; global batch {s['global_batch_size']} "
              f"sequences; Adam lr {s['lr']:g} -> {s['min_lr']:g} cosine, {s['lr_warmup_iters']} warm-up steps.",
              f"- Teacher: {s['teacher_iters']} steps (seed {s['teacher_seed']}). Students: {s['student_iters']} steps "
              f"each, same initial weights (seed {s['student_seed']}) and data order (the first {s['student_iters']} "
              f"batches the teacher saw); distill weight {s['distill_weight']:g}. Students trained {meta['jobs']} at a "
              f"time; {rows[-1].get('threads', '?')} torch thread(s) per run.",
              f"- Data: {meta['data']}; held-out evaluation on {by[rows[0]['run']]['heldout_tokens']:,} tokens.",
              f"- Date {meta['date']}; commit {meta['commit']}; {meta['host']}; wall time {meta['wall_s'] / 60:.1f} min; "
              f"1-minute load average at the end {meta['load']:.1f} (other jobs shared the machine: times are noisy).",
              f"- Curves: {os.path.basename(meta['png'])}; every run's numbers: {os.path.basename(meta['jsonl'])}.", ""]
    return "\n".join(lines)


def plot(rows: List[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"teacher": "black", "scratch": "tab:gray", "copy": "tab:blue", "distill": "tab:orange"}
    for r in rows:
        it = [p["iteration"] for p in r["curve"]]
        style = "--" if r["run"] == "teacher" else "-"
        ax1.plot(it, [p["ppl"] for p in r["curve"]], style, color=colors[r["run"]], label=LABELS[r["run"]])
        if r["run"] == "distill":
            ax2.plot(it, [p["attn_kl"] for p in r["curve"]], color=colors["distill"], label="held-out")
            ax2.plot(range(1, len(r["train_attn_kl"]) + 1), r["train_attn_kl"], color=colors["distill"], alpha=0.3,
                     label="training batches")
    ax1.set_yscale("log")
    ax1.set_xlabel("training step")
    ax1.set_ylabel("held-out perplexity")
    ax1.set_title(title)
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.set_xlabel("training step")
    ax2.set_ylabel("attention KL(teacher || student)")
    ax2.set_title("distillation: attention KL")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return single_rank_worker(argv[1], argv[2], train_run)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=("gpt", "llama"), default="gpt")
    p.add_argument("--scale", choices=tuple(SCALES), default="cpu-small")
    p.add_argument("--teacher-iters", type=int, default=None)
    p.add_argument("--student-iters", type=int, default=None)
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument("--eval-interval", type=int, default=None)
    p.add_argument("--eval-windows", type=int, default=None, help="held-out windows in the final evaluation (0: all)")
    p.add_argument("--runs", nargs="+", choices=STUDENTS, default=list(STUDENTS), help="which students to train")
    p.add_argument("--jobs", type=int, default=3, help="students trained side by side (each in its own process)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (default 1: on a small or shared CPU, more threads per process spin "
                        "more than they compute; 0: CPU cores / jobs)")
    p.add_argument("--reuse-teacher", action="store_true",
                   help="reuse the teacher saved in --work-dir by an earlier run with the same settings")
    p.add_argument("--mock-data", action="store_true", help="synthetic tokens instead of the embedded corpus")
    p.add_argument("--work-dir", default=DEFAULT_WORK_DIR, help="data, the teacher checkpoint, dataset caches")
    p.add_argument("--output-prefix", default=DEFAULT_OUTPUT_PREFIX)
    args = p.parse_args(argv)

    s = dict(SCALES[args.scale])
    for key in ("teacher_iters", "student_iters", "eval_interval", "eval_windows"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    s.update(arch=args.arch, scale=args.scale, distill_weight=args.distill_weight, teacher_seed=4321,
             student_seed=1234)
    t_start = time.time()
    os.makedirs(args.work_dir, exist_ok=True)
    data = prepare_data(args, s)
    tag = f"{args.arch}_{args.scale}_{s['teacher_iters']}_{'mock' if args.mock_data else 'stdlib'}"
    teacher_dir = os.path.join(args.work_dir, f"teacher_{tag}")
    common = {"settings": s, "data": data, "teacher_dir": teacher_dir,
              "cache_dir": os.path.join(args.work_dir, "dataset_cache")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher_row_path = os.path.join(teacher_dir, "benchmark_row.json")
        if args.reuse_teacher and os.path.isfile(teacher_row_path):
            with open(teacher_row_path) as f:
                rows.append(json.load(f))
        else:
            rows += run_in_processes([{**common, "run": "teacher"}], tmp, 1, args.threads)
            with open(teacher_row_path, "w") as f:
                json.dump(rows[-1], f)
        rows += run_in_processes([{**common, "run": run} for run in args.runs], tmp, args.jobs, args.threads)
    for r in rows:
        print(json.dumps({k: v for k, v in r.items() if k not in ("curve", "losses", "train_attn_kl")}), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    meta = {
        "settings": s, "vocab_size": data["vocab_size"], "data": data["description"],
        "command": "python benchmarks/attention_transfer.py " + shlex.join(argv),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "commit": git_commit(),
        "host": f"{py_platform.machine()}, {os.cpu_count()} CPU cores, no GPU" if not _cuda() else "GPU",
        "wall_s": time.time() - t_start, "load": os.getloadavg()[0], "jobs": args.jobs,
        "png": args.output_prefix + ".png", "jsonl": args.output_prefix + ".jsonl",
    }
    with open(meta["jsonl"], "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(args.output_prefix + ".md", "w") as f:
        f.write(summarize(rows, meta))
    plot(rows, meta["png"], f"{args.arch}: held-out perplexity")
    print(f"wrote {args.output_prefix}.md, .png, .jsonl ({meta['wall_s'] / 60:.1f} min)", flush=True)
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
