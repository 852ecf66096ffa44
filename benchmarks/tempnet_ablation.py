#!/usr/bin/env python
r"""Does TempNet help when training from scratch? The paper's four-arm ablation, at a small scale, honestly.

    python benchmarks/tempnet_ablation.py                       # GPT, 4 arms x 3 seeds, ~1 hour on 2 CPU cores
    python benchmarks/tempnet_ablation.py --arch llama          # the same with a small LLaMA
    python benchmarks/tempnet_ablation.py --scale gpt2-125m --corpus owt2.jsonl     # on a GPU

Arms (Qiu et al. 2024, "To Cool or not to Cool?", Table "ablation"):
  baseline         plain cross-entropy (no --tempnet-enabled; the DRO loss with tau = 1 and rho = log V)
  dro_global       DRO with one learned global temperature, no TempNet (--tempnet-kind global --objective dro)
  tempnet_tau_ce   TempNet trained with the plain tau-scaled cross-entropy CE(z/tau), no DRO term (--objective tau_ce)
  tempnet_dro      TempNet + DRO (--tempnet-enabled --objective dro)
Every arm of a seed starts from the same LM weights, reads the same tokens in the same order, for the same
number of steps, under the same LM learning-rate schedule; only the temperature and the objective differ
(tests/test_ablation.py checks it). Each (arm, seed) trains in a fresh process (megatron-core's process groups are
global state): a 1-rank gloo group on a CPU, TP = PP = 1.

Data. Default: the embedded corpus (the Python standard library's .py files), with whole FILES held out by a hash of
their path (--holdout-fraction, default 0.05: 41 files, ~0.36M tokens). The sentencepiece tokenizer is trained on
the training files only. `--corpus FILE.jsonl` uses another corpus ({"text": ...} per line; documents held out by a
hash of their "path"/"id" field, or of their text). Held-out text is read only by the evaluation and is never used
for any choice (no early stopping, no selection, no tuning; the defaults below were fixed before any run).

Evaluation on the held-out documents, cut into consecutive windows of seq_length + 1 tokens:
  perplexity at tau = 1 and with the arm's own temperatures (the baseline's are 1);
  expected calibration error (ECE) of the top-1 next-token prediction, 15 equal-width confidence bins, at tau = 1
  and with the arm's tau (tau rescales confidence, never the argmax);
  top-1 accuracy, tau mean and std over tokens, and the logit scale (per-token std of the logits over the vocabulary).
The model's own forward without labels gives the logits [b, s, V] (TP = 1: the whole, padded vocabulary; the
padding beyond the true V is sliced off) and tau [b, s]. A validation curve (the same metrics on a fixed, spread
subset of the held-out windows) is taken every --eval-interval steps; the final numbers use all held-out windows.

Reference values and the defaults derived from them (fixed a priori, documented in the table):
  GPT-2 125M from scratch (github zhqiu/TempNet, owt2_setup_tempnet.yml, configs/125M.yml): rho = 8.0 with
  V = 50304 (log V - rho = 2.83 nats), TempNet lr 2e-6 for 50k steps, tau in [0.5, 5.0], TempNet hidden 256,
  dropout 0.5; LM lr 6e-4 -> 6e-5, cosine, 1% warmup. LLaMA (LLaMA-2/pretrain_llama_distributed.sh): rho = 8.5 with
  V = 32000 (log V - rho = 1.87 nats), tau in [0.01, 2.0] (docs/design.md), max-shifted TempNet input.
  * rho: at its optimum dL/dtau = rho - KL(softmax(z/tau) || uniform) = 0, i.e. TempNet aims the entropy of the
    tempered prediction at log V - rho. The default keeps the reference's target entropy at our vocabulary:
    rho = log V - 2.83 (GPT) or log V - 1.87 (LLaMA). --rho sets it directly.
  * TempNet lr: Adam moves a parameter by about lr per step, so the default keeps the reference's total budget
    lr x steps = 2e-6 x 50000 = 0.1: tempnet lr = 0.1 / train_iters (min lr a tenth of it). --tempnet-lr sets it.
  * tau range and TempNet dropout: the reference's, per architecture.

Output: one JSON line per (arm, seed) on stdout and in <output-prefix>.jsonl; a markdown table of mean and standard
deviation per arm with the command, the date, the configuration and a plain verdict (<output-prefix>.md); the
validation curves (<output-prefix>.png). Default prefix: benchmarks/results/tempnet_ablation.

Verdict rule (stated in the table): an arm "beats" the baseline on a metric when its mean is better than the
baseline's by more than two pooled seed standard deviations, sqrt((sd_baseline^2 + sd_arm^2) / 2); "is worse" when
it is worse by more than that; otherwise the difference is within noise at this scale.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from benchmarks._shared import (  # noqa: E402
    git_commit, heldout_windows, run_workers, single_rank_worker, spread_subset, train_dataset)

DEFAULT_OUTPUT_PREFIX = os.path.join(REPO, "benchmarks", "results", "tempnet_ablation")
DEFAULT_WORK_DIR = os.path.join(REPO, "runs", "tempnet_ablation")

# The four arms, as the trainer's flags. Everything else is shared (common_flags).
ARMS: Dict[str, List[str]] = {
    "baseline": [],
    "dro_global": ["--tempnet-enabled", "--tempnet-kind", "global", "--objective", "dro"],
    "tempnet_tau_ce": ["--tempnet-enabled", "--tempnet-kind", "network", "--objective", "tau_ce"],
    "tempnet_dro": ["--tempnet-enabled", "--tempnet-kind", "network", "--objective", "dro"],
}
ARM_LABELS = {
    "baseline": "(1) baseline CE",
    "dro_global": "(2) DRO, global tau",
    "tempnet_tau_ce": "(3) TempNet, tau-CE",
    "tempnet_dro": "(4) TempNet + DRO",
}

# Reference values (zhqiu/TempNet) per architecture: the DRO target entropy log V - rho, tau range, TempNet dropout
# and input variant; the TempNet learning-rate budget lr x steps.
REFERENCE = {
    "gpt": dict(rho=8.0, rho_vocab=50304, tau_min=0.5, tau_max=5.0, dropout=0.5, input_variant="normalized"),
    "llama": dict(rho=8.5, rho_vocab=32000, tau_min=0.01, tau_max=2.0, dropout=0.5, input_variant="max_shifted"),
}
REFERENCE_TEMPNET_LR, REFERENCE_TRAIN_ITERS = 2e-6, 50000

# Sizes. "cpu-small" finishes 4 arms x 3 seeds in about an hour on 2 CPU cores; "gpt2-125m" is the paper's model
# (GPT-2 small) for a GPU, with the reference's LM schedule; "test" is for the test-suite.
SCALES = {
    "cpu-small": dict(num_layers=4, hidden_size=128, num_attention_heads=4, seq_length=128, micro_batch_size=16,
                      global_batch_size=16, train_iters=600, lr=2e-3, min_lr=2e-4, lr_warmup_iters=30,
                      vocab_size=4096, tempnet_hidden_size=256, eval_interval=50, curve_windows=64,
                      eval_windows=0, eval_micro_batch_size=16, loss_impl="reference"),
    "gpt2-125m": dict(num_layers=12, hidden_size=768, num_attention_heads=12, seq_length=1024, micro_batch_size=8,
                      global_batch_size=64, train_iters=20000, lr=6e-4, min_lr=6e-5, lr_warmup_iters=200,
                      vocab_size=32000, tempnet_hidden_size=256, eval_interval=1000, curve_windows=256,
                      eval_windows=0, eval_micro_batch_size=8, loss_impl="auto"),
    "test": dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, micro_batch_size=2,
                 global_batch_size=4, train_iters=4, lr=1e-2, min_lr=1e-3, lr_warmup_iters=1,
                 vocab_size=250, tempnet_hidden_size=16, eval_interval=2, curve_windows=4,
                 eval_windows=8, eval_micro_batch_size=4, loss_impl="reference"),
}

ECE_BINS = 15


# ---------------------------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------------------------

def top1_confidence(logits, tau=None):
    """logits [..., V] (true vocabulary only), tau [...] or None (= 1) -> (confidence [...], prediction [...]):
    the largest probability of softmax(logits / tau) and its index. tau > 0 never changes the prediction."""
    conf, pred, _ = prediction_stats(logits, tau)
    return conf, pred


def prediction_stats(logits, tau=None, labels=None):
    """(top-1 confidence, top-1 prediction, cross-entropy or None) of softmax(logits / tau), one pass over the
    vocabulary for the log-normaliser: conf = exp(max_k z_k/tau - logsumexp(z/tau)), CE = logsumexp - z_y/tau."""
    import torch

    z = logits if tau is None else logits / tau.to(logits.dtype).unsqueeze(-1)
    lse = torch.logsumexp(z, dim=-1)
    zmax, pred = z.max(dim=-1)
    conf = torch.exp(zmax - lse)
    ce = None if labels is None else lse - z.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return conf, pred, ce


class CalibrationBins:
    """Equal-width confidence bins (lo, hi] over [0, 1], accumulated over batches.

    ECE = sum over bins of |sum of confidences - number correct| / number of predictions
        = sum_b (n_b / n) |mean confidence_b - accuracy_b|      (Guo et al. 2017)."""

    def __init__(self, n_bins: int = ECE_BINS):
        import torch

        self.n_bins = n_bins
        self.count = torch.zeros(n_bins, dtype=torch.float64)
        self.conf_sum = torch.zeros(n_bins, dtype=torch.float64)
        self.correct_sum = torch.zeros(n_bins, dtype=torch.float64)

    def add(self, confidence, correct) -> None:
        import torch

        conf = confidence.detach().reshape(-1).double().cpu()
        corr = correct.detach().reshape(-1).double().cpu()
        idx = (torch.ceil(conf * self.n_bins) - 1).clamp_(0, self.n_bins - 1).long()
        self.count.index_add_(0, idx, torch.ones_like(conf))
        self.conf_sum.index_add_(0, idx, conf)
        self.correct_sum.index_add_(0, idx, corr)

    def ece(self) -> float:
        n = float(self.count.sum())
        return float((self.conf_sum - self.correct_sum).abs().sum()) / n if n else float("nan")


def expected_calibration_error(confidence, correct, n_bins: int = ECE_BINS) -> float:
    """ECE of predictions with these top-1 confidences and correctness (bool or 0/1), n_bins equal-width bins."""
    bins = CalibrationBins(n_bins)
    bins.add(confidence, correct)
    return bins.ece()


# ---------------------------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------------------------

def default_rho(arch: str, vocab_size: int) -> float:
    """log V - (the reference's log V_ref - rho_ref): the reference's target entropy of the tempered prediction."""
    ref = REFERENCE[arch]
    return math.log(vocab_size) - (math.log(ref["rho_vocab"]) - ref["rho"])


def default_tempnet_lr(train_iters: int) -> float:
    """The reference's TempNet budget lr x steps (2e-6 x 50000 = 0.1) spread over train_iters."""
    return REFERENCE_TEMPNET_LR * REFERENCE_TRAIN_ITERS / train_iters


def resolve_settings(args: argparse.Namespace, vocab_size: int) -> dict:
    """Every number a run needs, from the scale preset, the reference rules and the command-line overrides."""
    s = dict(SCALES[args.scale])
    for key in ("train_iters", "micro_batch_size", "global_batch_size", "lr", "min_lr", "lr_warmup_iters",
                "eval_interval", "curve_windows", "eval_windows", "loss_impl"):
        if getattr(args, key, None) is not None:
            s[key] = getattr(args, key)
    ref = REFERENCE[args.arch]
    s.update(arch=args.arch, scale=args.scale, vocab_size=vocab_size)
    s["rho"] = args.rho if args.rho is not None else default_rho(args.arch, vocab_size)
    s["tempnet_lr"] = args.tempnet_lr if args.tempnet_lr is not None else default_tempnet_lr(s["train_iters"])
    s["tempnet_min_lr"] = s["tempnet_lr"] / 10
    s["tau_min"] = args.tau_min if args.tau_min is not None else ref["tau_min"]
    s["tau_max"] = args.tau_max if args.tau_max is not None else ref["tau_max"]
    s["tempnet_dropout"] = args.tempnet_dropout if args.tempnet_dropout is not None else ref["dropout"]
    s["tempnet_input_variant"] = ref["input_variant"]
    s["precision"] = args.precision
    return s


def common_flags(s: dict, data: dict) -> List[str]:
    """Flags shared by every arm: model, data, LM schedule, and TempNet's settings (inert without --tempnet-enabled)."""
    flags = [
        "--arch", s["arch"], "--num-layers", str(s["num_layers"]), "--hidden-size", str(s["hidden_size"]),
        "--num-attention-heads", str(s["num_attention_heads"]), "--seq-length", str(s["seq_length"]),
        "--micro-batch-size", str(s["micro_batch_size"]), "--global-batch-size", str(s["global_batch_size"]),
        "--train-iters", str(s["train_iters"]), "--lr", repr(s["lr"]), "--min-lr", repr(s["min_lr"]),
        "--lr-warmup-iters", str(s["lr_warmup_iters"]), "--lr-decay-style", "cosine",
        "--eval-interval", "0", "--log-interval", "1000000000", "--precision", s["precision"],
        "--loss-impl", s["loss_impl"],
        "--tempnet-hidden-size", str(s["tempnet_hidden_size"]), "--tempnet-tau-min", repr(s["tau_min"]),
        "--tempnet-tau-max", repr(s["tau_max"]), "--tempnet-dropout", repr(s["tempnet_dropout"]),
        "--tempnet-input-variant", s["tempnet_input_variant"],
        "--tempnet-lr", repr(s["tempnet_lr"]), "--tempnet-min-lr", repr(s["tempnet_min_lr"]),
    ]
    if s["arch"] == "llama":
        flags += ["--num-query-groups", str(max(1, s["num_attention_heads"] // 2))]
    if data.get("mock"):
        flags += ["--mock-data", "--vocab-size", str(s["vocab_size"])]
    else:
        flags += ["--data-path", *data["train"], "--tokenizer-model", data["tokenizer"], "--split", "100,0,0"]
    return flags


def is_dro_arm(arm: str) -> bool:
    sw = ARMS[arm]
    return "--objective" in sw and sw[sw.index("--objective") + 1] == "dro"


def arm_flags(arm: str, s: dict, data: dict) -> List[str]:
    """The trainer's flags for one arm: the shared ones, the arm's switches, and rho for the DRO arms only (the
    baseline keeps rho = log V, which with tau = 1 is plain cross-entropy)."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    flags = common_flags(s, data) + ARMS[arm]
    if is_dro_arm(arm):
        flags += ["--dro-rho", repr(s["rho"])]
    return flags


def arm_config(arm: str, seed: int, s: dict, data: dict):
    """The megatron_tempnet Config this script trains for (arm, seed)."""
    from megatron_tempnet.config import load_config

    cfg, _ = load_config(arm_flags(arm, s, data) + ["--seed", str(seed)])
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------

def _split_jsonl(corpus: str, train_out: str, heldout_out: str, fraction: float) -> dict:
    """Hold out whole documents of a JSONL corpus by a hash of their "path"/"id" field (else of their text)."""
    from megatron_tempnet.data.corpus import is_heldout

    counts = {"train_docs": 0, "heldout_docs": 0}
    with open(corpus, encoding="utf-8") as f, open(train_out + ".tmp", "w", encoding="utf-8") as tr, \
            open(heldout_out + ".tmp", "w", encoding="utf-8") as ho:
        for line in f:
            if not line.strip():
                continue
            doc = json.loads(line)
            key = str(doc.get("path", doc.get("id", doc.get("text", ""))))
            side = "heldout" if is_heldout(key, fraction) else "train"
            (ho if side == "heldout" else tr).write(line if line.endswith("\n") else line + "\n")
            counts[f"{side}_docs"] += 1
    os.replace(train_out + ".tmp", train_out)
    os.replace(heldout_out + ".tmp", heldout_out)
    return counts


def prepare_data(args: argparse.Namespace, vocab_size: int) -> dict:
    """Corpus split by document -> tokenizer (training documents only) -> indexed datasets; reused when present."""
    if args.mock_data:
        return {"mock": True, "vocab_size": vocab_size, "description": "synthetic tokens (MockTokens)"}
    if args.data_path:
        if not (args.heldout_data_path and args.tokenizer_model):
            raise SystemExit("--data-path needs --heldout-data-path and --tokenizer-model")
        from megatron_tempnet.data.tokenizer import load_tokenizer

        return {"train": args.data_path, "heldout": args.heldout_data_path, "tokenizer": args.tokenizer_model,
                "vocab_size": load_tokenizer(args.tokenizer_model).vocab_size,
                "description": f"given: train {args.data_path}, held out {args.heldout_data_path}"}
    from megatron_tempnet.data.corpus import prepare_stdlib_dataset

    if args.corpus == "stdlib":
        out_dir = os.path.join(args.work_dir, f"data_stdlib_v{vocab_size}_h{args.holdout_fraction:g}")
        prep = prepare_stdlib_dataset(out_dir, vocab_size=vocab_size, holdout_fraction=args.holdout_fraction,
                                      workers=0)
        heldout_jsonl = os.path.join(out_dir, "stdlib_heldout.jsonl")
        desc = (f"embedded corpus (this Python's standard library .py files, tests excluded), "
                f"{args.holdout_fraction:g} of the files held out by path hash")
    else:
        from megatron_tempnet.data.inputs import iter_texts
        from megatron_tempnet.data.preprocess import PreprocessConfig, preprocess
        from megatron_tempnet.data.tokenizer import train_sentencepiece

        name = os.path.splitext(os.path.basename(args.corpus))[0]
        out_dir = os.path.join(args.work_dir, f"data_{name}_v{vocab_size}_h{args.holdout_fraction:g}")
        os.makedirs(out_dir, exist_ok=True)
        train_jsonl, heldout_jsonl = os.path.join(out_dir, "train.jsonl"), os.path.join(out_dir, "heldout.jsonl")
        if not os.path.isfile(heldout_jsonl):
            _split_jsonl(args.corpus, train_jsonl, heldout_jsonl, args.holdout_fraction)
        tok = os.path.join(out_dir, f"tokenizer_{vocab_size}")
        if not os.path.isfile(tok + ".model"):
            train_sentencepiece(iter_texts([train_jsonl]), tok, vocab_size)
        prep = {"tokenizer": tok + ".model"}
        for side, src in (("data_path", train_jsonl), ("heldout_data_path", heldout_jsonl)):
            man = preprocess(PreprocessConfig(inputs=[src], output_prefix=os.path.join(out_dir, side),
                                              tokenizer=tok + ".model", append_eod=True, workers=0))
            prep[side] = [os.path.join(out_dir, p) for p in man["prefixes"]["text"]]
        desc = f"{args.corpus}, {args.holdout_fraction:g} of the documents held out by hash of path/id/text"
    with open(heldout_jsonl, encoding="utf-8") as f:
        heldout_docs = sum(1 for line in f if line.strip())
    return {"train": prep["data_path"], "heldout": prep["heldout_data_path"], "tokenizer": prep["tokenizer"],
            "vocab_size": vocab_size, "heldout_docs": heldout_docs, "description": desc}


# ---------------------------------------------------------------------------------------------------------------
# One run (inside a fresh process with a 1-rank group)
# ---------------------------------------------------------------------------------------------------------------

def heldout_metrics(model_chunk, windows, vocab_size: int, micro_batch_size: int) -> dict:
    """Perplexity at tau = 1 and at the model's tau, ECE of both, accuracy, tau and logit statistics, on windows
    [n, s + 1], through the model's forward without labels (TP = 1: logits over the whole padded vocabulary)."""
    import torch
    from megatron.core import parallel_state

    from megatron_tempnet import runtime
    from megatron_tempnet.models.build import causal_mask

    if parallel_state.get_tensor_model_parallel_world_size() != 1 or parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise RuntimeError("the ablation's evaluation runs at TP = PP = 1 (full-vocabulary logits on one rank)")
    dev = runtime.device()
    s = windows.size(1) - 1
    mask = causal_mask(s, dev)
    sums = dict(tokens=0.0, ce1=0.0, ce_tau=0.0, correct=0.0, tau=0.0, tau_sq=0.0, logit_std=0.0)
    bins1, bins_tau = CalibrationBins(), CalibrationBins()
    model_chunk.eval()
    try:
        with torch.no_grad():
            for i in range(0, windows.size(0), micro_batch_size):
                w = windows[i:i + micro_batch_size].to(dev)
                tokens, labels = w[:, :-1], w[:, 1:]
                pos = torch.arange(s, device=dev).unsqueeze(0).expand_as(tokens)
                with runtime.native_torch():
                    logits, tau = model_chunk(tokens, pos, mask)
                z = logits[..., :vocab_size].float()  # drop padded vocabulary entries
                tau = torch.ones(labels.shape, device=dev) if tau is None else tau.float()
                conf1, pred, ce1 = prediction_stats(z, None, labels)
                conf_tau, _, ce_tau = prediction_stats(z, tau, labels)
                correct = pred == labels
                bins1.add(conf1, correct)
                bins_tau.add(conf_tau, correct)
                sums["ce1"] += float(ce1.double().sum())
                sums["ce_tau"] += float(ce_tau.double().sum())
                sums["tokens"] += labels.numel()
                sums["correct"] += float(correct.sum())
                sums["tau"] += float(tau.double().sum())
                sums["tau_sq"] += float((tau.double() ** 2).sum())
                sums["logit_std"] += float(z.std(dim=-1).double().sum())
    finally:
        model_chunk.train()
    n = sums["tokens"]
    tau_mean = sums["tau"] / n
    return {
        "tokens": int(n),
        "ppl_tau1": math.exp(sums["ce1"] / n), "ppl_tau": math.exp(sums["ce_tau"] / n),
        "ce_tau1": sums["ce1"] / n, "ce_tau": sums["ce_tau"] / n,
        "ece_tau1": bins1.ece(), "ece_tau": bins_tau.ece(), "acc": sums["correct"] / n,
        "tau_mean": tau_mean, "tau_std": math.sqrt(max(sums["tau_sq"] / n - tau_mean ** 2, 0.0)),
        "logit_std": sums["logit_std"] / n,
    }


def train_arm(spec: dict) -> dict:
    """Train one (arm, seed) and evaluate it on the held-out windows. Needs RANK/WORLD_SIZE/MASTER_* set (a 1-rank
    group is started here). spec: arm, seed, settings, data, cache_dir; optional overrides ({"section.field": value}
    applied to the arm's Config), keep_params (return the final weights), log (print progress). Returns the result row (with per-step "losses" and the held-out "curve")."""
    import torch

    from megatron_tempnet.finalize import resolve
    from megatron_tempnet.training.loop import data_iterators, setup_run
    from megatron_tempnet.training.step import train_step

    s, data = spec["settings"], spec["data"]
    cfg = arm_config(spec["arm"], spec["seed"], s, data)
    for key, value in (spec.get("overrides") or {}).items():  # "section.field": value (tests' variants)
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    if spec.get("cache_dir"):
        cfg.data.data_cache_path = spec["cache_dir"]
    t0 = time.perf_counter()
    cfg = resolve(cfg).cfg  # the vocabulary from the tokenizer, the optimizer choice
    model, optimizer, scheduler = setup_run(cfg)
    vocab = cfg.model.vocab_size
    windows = heldout_windows(data, cfg.model.seq_length, vocab)
    if s.get("eval_windows"):
        windows = spread_subset(windows, s["eval_windows"])
    curve_windows = spread_subset(windows, s["curve_windows"])
    iters = data_iterators(cfg, train_dataset(cfg, shuffle_seed=cfg.train.seed), 0, len(model))
    setup_s = time.perf_counter() - t0

    losses, curve, step_times = [], [], []
    train_s = eval_s = 0.0
    interval = s["eval_interval"]
    window_losses: List[float] = []
    for it in range(1, cfg.train.train_iters + 1):
        t1 = time.perf_counter()
        metrics = train_step(cfg, model, optimizer, scheduler, iters)
        step_times.append(time.perf_counter() - t1)
        losses.append(metrics["loss"])
        window_losses.append(metrics["ce_tau"])
        if not metrics["update_successful"]:
            print(f"[{spec['arm']} seed {spec['seed']}] step {it} skipped (non-finite loss or grad)", flush=True)
        if (interval and it % interval == 0) or it == cfg.train.train_iters:
            t2 = time.perf_counter()
            point = heldout_metrics(model[0], curve_windows, vocab, s["eval_micro_batch_size"])
            eval_s += time.perf_counter() - t2
            point.update(iteration=it, train_ce_tau=sum(window_losses) / len(window_losses),
                         train_tau_mean=metrics["tau_mean"])
            window_losses = []
            curve.append(point)
            if spec.get("log"):
                print(f"[{spec['arm']} seed {spec['seed']}] iter {it} | train ce(z/tau) {point['train_ce_tau']:.3f}"
                      f" | held-out ppl tau=1 {point['ppl_tau1']:.2f} own tau {point['ppl_tau']:.2f}"
                      f" | ECE {point['ece_tau1']:.3f}/{point['ece_tau']:.3f} | tau {point['tau_mean']:.3f}"
                      f" | {sum(step_times[-interval:]) / len(step_times[-interval:]):.3f} s/step", flush=True)
    train_s = sum(step_times)
    t3 = time.perf_counter()
    final = heldout_metrics(model[0], windows, vocab, s["eval_micro_batch_size"])
    eval_s += time.perf_counter() - t3
    row = {
        "arm": spec["arm"], "seed": spec["seed"], "arch": s["arch"], "scale": s["scale"],
        "train_iters": cfg.train.train_iters,
        "tokens_seen": cfg.train.train_iters * cfg.train.global_batch_size * cfg.model.seq_length,
        "heldout_tokens": final.pop("tokens"), **final,
        "final_train_loss": losses[-1],
        "setup_s": round(setup_s, 2), "train_s": round(train_s, 2), "eval_s": round(eval_s, 2),
        "median_step_s": round(statistics.median(step_times), 4),
        "curve": curve, "losses": losses,
    }
    if spec.get("keep_params"):
        row["params"] = {k: v.detach().clone().cpu() for k, v in model[0].module.state_dict().items()
                         if isinstance(v, torch.Tensor)}
    return row


# ---------------------------------------------------------------------------------------------------------------
# Summary: table, verdict, plot
# ---------------------------------------------------------------------------------------------------------------

METRICS = [  # (key, label, lower is better, format)
    ("ppl_tau1", "ppl (tau=1)", True, "{:.3f}"),
    ("ppl_tau", "ppl (own tau)", True, "{:.3f}"),
    ("ece_tau1", "ECE (tau=1)", True, "{:.4f}"),
    ("ece_tau", "ECE (own tau)", True, "{:.4f}"),
    ("acc", "top-1 acc", False, "{:.4f}"),
    ("tau_mean", "tau mean", None, "{:.3f}"),
    ("tau_std", "tau std", None, "{:.3f}"),
    ("logit_std", "logit std", None, "{:.2f}"),
]


def mean_sd(values: Sequence[float]) -> tuple:
    vals = list(values)
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else float("nan"))


def compare(base: Sequence[float], arm: Sequence[float], lower_is_better: bool = True) -> dict:
    """The verdict rule: better / worse when the means differ by more than two pooled seed standard deviations
    sqrt((sd_base^2 + sd_arm^2) / 2); also the per-seed (paired) difference, mean and sd."""
    mb, sb = mean_sd(base)
    ma, sa = mean_sd(arm)
    pooled = math.sqrt((sb ** 2 + sa ** 2) / 2) if len(base) > 1 and len(arm) > 1 else float("nan")
    diff = ma - mb
    gain = -diff if lower_is_better else diff
    if math.isnan(pooled):
        verdict = "undecided (one seed: no standard deviation)"
    elif gain > 2 * pooled:
        verdict = "better"
    elif -gain > 2 * pooled:
        verdict = "worse"
    else:
        verdict = "within 2 sd"
    paired = [a - b for a, b in zip(arm, base)]
    pm, ps = mean_sd(paired) if paired else (float("nan"), float("nan"))
    return {"diff": diff, "pooled_sd": pooled, "sds": diff / pooled if pooled and not math.isnan(pooled) else float("nan"),
            "verdict": verdict, "paired_mean": pm, "paired_sd": ps}


def _fmt(fmt: str, m: float, s: float) -> str:
    return fmt.format(m) + ("" if math.isnan(s) else " ± " + fmt.format(s))


def summarize(rows: List[dict], meta: dict) -> str:
    """The markdown report: verdict, table (mean ± sd over seeds), per-seed rows, configuration, command."""
    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    by_arm = {a: sorted((r for r in rows if r["arm"] == a), key=lambda r: r["seed"]) for a in arms}
    s = meta["settings"]
    lines = [f"# TempNet ablation from scratch ({s['arch']}, scale {s['scale']})", ""]
    # Verdict first.
    lines += ["## Verdict", ""]
    if "baseline" in by_arm and len(arms) > 1:
        base = by_arm["baseline"]
        seeds_b = [r["seed"] for r in base]
        for arm in arms[1:]:
            rows_a = by_arm[arm]
            if [r["seed"] for r in rows_a] != seeds_b:
                lines.append(f"- {ARM_LABELS[arm]}: seeds differ from the baseline's; no comparison")
                continue
            parts = []
            for key, label, lower, fmt in METRICS[:4]:
                c = compare([r[key] for r in base], [r[key] for r in rows_a], lower)
                word = {"better": "BEATS the baseline", "worse": "is WORSE than the baseline"}.get(
                    c["verdict"], "no difference beyond 2 sd" if c["verdict"] == "within 2 sd" else c["verdict"])
                parts.append(f"{label}: {word} (Δ {c['diff']:+.4g}, {c['sds']:+.1f} pooled sd; "
                             f"paired Δ {c['paired_mean']:+.4g} ± {c['paired_sd']:.2g})")
            lines.append(f"- **{ARM_LABELS[arm]}** vs (1): " + "; ".join(parts) + ".")
        if "tempnet_dro" in by_arm:
            c1 = compare([r["ppl_tau1"] for r in base], [r["ppl_tau1"] for r in by_arm["tempnet_dro"]])
            c2 = compare([r["ppl_tau"] for r in base], [r["ppl_tau"] for r in by_arm["tempnet_dro"]])
            def say(c):
                return {"better": "beats the baseline by more than two standard deviations",
                        "worse": "is worse than the baseline by more than two standard deviations"}.get(
                    c["verdict"], "does not differ from the baseline by more than two standard deviations")
            lines += ["", f"**In plain words: at this scale, TempNet + DRO {say(c2)} in held-out perplexity with its "
                          f"own temperatures ({c2['sds']:+.1f} sd), and {say(c1)} at tau = 1 ({c1['sds']:+.1f} sd).** "
                          "(Paper, GPT-2 125M after 50k steps on OpenWebText2: WikiText ppl 49.86 -> 47.32.)"]
    lines += ["", "Rule: an arm beats the baseline on a metric when its mean over seeds is better by more than two "
              "pooled seed standard deviations, sqrt((sd_baseline² + sd_arm²)/2); Δ = arm − baseline (for ppl and "
              "ECE, negative is better); the paired Δ is the per-seed difference (same seed = same initial LM "
              "weights and data order).", ""]
    # Table.
    lines += ["## Held-out results (mean ± sd over seeds)", ""]
    header = "| arm | seeds | " + " | ".join(m[1] for m in METRICS) + " | train s/run |"
    lines += [header, "|" + "---|" * (len(METRICS) + 3)]
    for arm in arms:
        rs = by_arm[arm]
        cells = [_fmt(fmt, *mean_sd([r[key] for r in rs])) for key, _, _, fmt in METRICS]
        lines.append(f"| {ARM_LABELS[arm]} | {len(rs)} | " + " | ".join(cells)
                     + f" | {statistics.fmean(r['train_s'] for r in rs):.0f} |")
    lines += ["", "Per seed:", "", "| arm | seed | ppl (tau=1) | ppl (own tau) | ECE (tau=1) | ECE (own tau) | "
              "tau mean | final train loss | train s | median s/step |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        for r in by_arm[arm]:
            lines.append(f"| {arm} | {r['seed']} | {r['ppl_tau1']:.3f} | {r['ppl_tau']:.3f} | {r['ece_tau1']:.4f} | "
                         f"{r['ece_tau']:.4f} | {r['tau_mean']:.3f} | {r['final_train_loss']:.4f} | {r['train_s']:.0f} "
                         f"| {r['median_step_s']:.3f} |")
    # Configuration and provenance.
    r0 = rows[0]
    lines += ["", "## Configuration", "",
              f"- Command: `{meta['command']}`",
              f"- Date: {meta['date']}; commit {meta['commit']}; host: {meta['host']}; wall time {meta['wall_s'] / 60:.1f} min"
              f" ({meta['jobs']} run(s) at a time, {meta['threads']} torch thread(s) each; 1-minute load average "
              f"{meta['load'][0]:.1f} at the start, {meta['load'][1]:.1f} at the end: timings include other users' load)",
              f"- Data: {meta['data']['description']}; " + ("" if meta["data"].get("mock") else
              f"tokenizer: sentencepiece BPE, V = {s['vocab_size']}, trained on the training documents only; "
              f"held-out documents: {meta['data'].get('heldout_docs', 'n/a')}, ") +
              f"{r0['heldout_tokens']:,} evaluated tokens ({r0['heldout_tokens'] // s['seq_length']} windows of "
              f"{s['seq_length']}).",
              f"- Model: {s['arch']}, {s['num_layers']} layers, hidden {s['hidden_size']}, {s['num_attention_heads']} "
              f"heads, seq {s['seq_length']}; fp32 on CPU (precision {s['precision']}); loss impl {s['loss_impl']}.",
              f"- Training (all arms): {s['train_iters']} steps x {s['global_batch_size']} sequences x {s['seq_length']}"
              f" tokens = {r0['tokens_seen']:,} tokens; Adam, LM lr {s['lr']:g} -> {s['min_lr']:g} cosine, "
              f"{s['lr_warmup_iters']} warmup steps, weight decay 0.1, clip 1.0. Seeds: "
              f"{', '.join(str(x) for x in meta['seeds'])} (a seed fixes the LM's initial weights and the data order, "
              "the same in every arm).",
              f"- Temperature arms: tau in [{s['tau_min']:g}, {s['tau_max']:g}]; TempNet hidden {s['tempnet_hidden_size']},"
              f" dropout {s['tempnet_dropout']:g}, input {s['tempnet_input_variant']}; TempNet / global-tau lr "
              f"{s['tempnet_lr']:.3g} -> {s['tempnet_min_lr']:.3g} ({'given' if meta['given']['tempnet_lr'] else 'default: the reference budget 2e-6 x 50000 steps / train_iters'}).",
              f"- DRO arms: rho = {s['rho']:.4f} nats ({'given' if meta['given']['rho'] else 'default: log V - ' + format(math.log(REFERENCE[s['arch']]['rho_vocab']) - REFERENCE[s['arch']]['rho'], '.3f') + ', the reference target entropy'}); "
              f"log V = {math.log(s['vocab_size']):.4f}. The baseline keeps rho = log V (plain cross-entropy).",
              f"- ECE: top-1 next-token prediction, {ECE_BINS} equal-width confidence bins; 'own tau' divides each "
              "token's logits by its temperature (the baseline's is 1). logit std: per-token std of the logits over "
              "the vocabulary (the logit scale).",
              f"- Validation curves ({os.path.basename(meta['png'])}): every {s['eval_interval']} steps on "
              f"{s['curve_windows']} held-out windows spread over all held-out documents; the final numbers use all of them.",
              "- Nothing was tuned: the defaults were fixed before any run and the held-out text is read by the "
              "evaluation only (no early stopping, no checkpoint selection).", ""]
    return "\n".join(lines)


def plot(rows: List[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    colors = dict(zip(ARMS, ["tab:gray", "tab:blue", "tab:orange", "tab:red"]))
    panels = [("ppl_tau1", "ppl_tau", "held-out perplexity", True), ("ece_tau1", "ece_tau", "held-out ECE (15 bins)", False),
              ("tau_mean", None, "held-out tau mean", False)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, (k1, k2, label, logy) in zip(axes, panels):
        for arm in arms:
            rs = [r for r in rows if r["arm"] == arm]
            its = [p["iteration"] for p in rs[0]["curve"]]
            for key, style in ((k1, "-"), (k2, "--")):
                if key is None or (arm == "baseline" and key == k2):
                    continue
                vals = np.array([[p[key] for p in r["curve"]] for r in rs])
                mean = vals.mean(0)
                ax.plot(its, mean, style, color=colors[arm], label=ARM_LABELS[arm] if key == k1 else None)
                if len(rs) > 1:
                    ax.fill_between(its, vals.min(0), vals.max(0), color=colors[arm], alpha=0.12, linewidth=0)
        ax.set_xlabel("training step")
        ax.set_title(label + ("  (solid: tau=1, dashed: own tau)" if k2 else ""), fontsize=9)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title + " — mean over seeds, band: min–max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["gpt", "llama"], default="gpt")
    p.add_argument("--scale", choices=list(SCALES), default="cpu-small")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    g = p.add_argument_group("data")
    g.add_argument("--corpus", default="stdlib", help="'stdlib' (embedded) or a JSONL file with a 'text' field")
    g.add_argument("--holdout-fraction", type=float, default=0.05, help="documents held out (by hash), default 0.05")
    g.add_argument("--vocab-size", type=int, default=None, help="tokenizer size (default: the scale's)")
    g.add_argument("--data-path", nargs="+", default=None, help="already preprocessed training prefixes / manifest")
    g.add_argument("--heldout-data-path", nargs="+", default=None, help="already preprocessed held-out prefixes")
    g.add_argument("--tokenizer-model", default=None, help="the tokenizer of --data-path")
    g.add_argument("--mock-data", action="store_true", help="synthetic tokens (smoke tests only)")
    g = p.add_argument_group("training (defaults: the scale's)")
    for name, tp in (("train-iters", int), ("micro-batch-size", int), ("global-batch-size", int), ("lr", float),
                     ("min-lr", float), ("lr-warmup-iters", int), ("eval-interval", int), ("curve-windows", int),
                     ("eval-windows", int)):
        g.add_argument("--" + name, type=tp, default=None)
    g.add_argument("--loss-impl", choices=["auto", "reference", "fused"], default=None)
    g.add_argument("--precision", default="auto", help="auto: bf16 on a GPU, fp32 on a CPU")
    g = p.add_argument_group("temperature and DRO (defaults: derived from the reference, see above)")
    g.add_argument("--rho", type=float, default=None, help="DRO radius in nats (default log V - 2.83 for GPT, - 1.87 LLaMA)")
    g.add_argument("--tempnet-lr", type=float, default=None, help="default 0.1 / train_iters (reference: 2e-6 x 50k)")
    g.add_argument("--tau-min", type=float, default=None)
    g.add_argument("--tau-max", type=float, default=None)
    g.add_argument("--tempnet-dropout", type=float, default=None)
    g = p.add_argument_group("execution and output")
    g.add_argument("--jobs", type=int, default=2,
                   help="runs at a time, each a fresh process (default 2: on a 2-core CPU two 1-thread runs of these "
                        "small models go faster than one 2-thread run, and keep going under others' load)")
    g.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    g.add_argument("--work-dir", default=DEFAULT_WORK_DIR, help="data, index caches and logs")
    g.add_argument("--output-prefix", default=DEFAULT_OUTPUT_PREFIX, help="writes .jsonl, .md, .png")
    g.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return single_rank_worker(*args.worker, train_arm)
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    vocab_size = args.vocab_size or SCALES[args.scale]["vocab_size"]
    os.makedirs(args.work_dir, exist_ok=True)
    print(f"[ablation] preparing data ({args.corpus if not args.mock_data else 'mock'})", file=sys.stderr, flush=True)
    data = prepare_data(args, vocab_size)
    settings = resolve_settings(args, data["vocab_size"])
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(args.jobs, 1))
    log_dir = os.path.join(args.work_dir, "logs")
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    jsonl_path = args.output_prefix + ".jsonl"
    runs = [(seed, arm) for seed in args.seeds for arm in args.arms]  # seed-major: partial results stay comparable
    rows: List[dict] = []
    open(jsonl_path, "w").close()
    specs = [{"name": f"{arm}_seed{seed}", "arm": arm, "seed": seed, "settings": settings, "data": data,
              "threads": threads, "log": True, "cache_dir": os.path.join(args.work_dir, "index-cache", f"{arm}_s{seed}")}
             for seed, arm in runs]
    for spec, row, seconds in run_workers(__file__, specs, args.jobs, log_dir, "ablation"):
        row["wall_s"] = round(seconds, 1)
        row.pop("losses", None)
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        with open(jsonl_path, "a") as f:
            f.write(line + "\n")
        print(f"[ablation] done {spec['arm']} seed {spec['seed']} in {row['wall_s']:.0f} s: ppl tau=1 {row['ppl_tau1']:.2f}, "
              f"own tau {row['ppl_tau']:.2f}, ECE {row['ece_tau1']:.4f}/{row['ece_tau']:.4f}", file=sys.stderr,
              flush=True)
    wall_s = time.perf_counter() - t_start
    command = "python benchmarks/tempnet_ablation.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])))
    meta = {"settings": settings, "data": data, "seeds": args.seeds, "command": command,
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "commit": git_commit(),
            "host": f"{os.cpu_count()} CPU cores" if not _cuda() else _cuda(), "wall_s": wall_s, "jobs": args.jobs,
            "threads": threads, "png": args.output_prefix + ".png",
            "load": (load_start, os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")),
            "given": {"rho": args.rho is not None, "tempnet_lr": args.tempnet_lr is not None}}
    rows.sort(key=lambda r: (list(ARMS).index(r["arm"]), r["seed"]))
    report = summarize(rows, meta)
    with open(args.output_prefix + ".md", "w") as f:
        f.write(report)
    plot(rows, args.output_prefix + ".png", f"TempNet ablation, {settings['arch']} {settings['scale']}, "
         f"{settings['train_iters']} steps, {len(args.seeds)} seeds")
    print(report, file=sys.stderr)
    print(f"[ablation] wrote {jsonl_path}, {args.output_prefix}.md, {args.output_prefix}.png in {wall_s / 60:.1f} min",
          file=sys.stderr)
    return 0


def _cuda() -> str:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    except Exception:
        return ""


if __name__ == "__main__":
    sys.exit(main())
