#!/usr/bin/env python
r"""Does TempNet's temperature follow the next-token entropy? Spearman correlation on held-out text.

    python benchmarks/tempnet_entropy.py                 # two arms, ~10-20 min on 2 busy CPU cores
    python benchmarks/tempnet_entropy.py --arms frozen --frozen-target lm --tempnet-steps 1000   # TempNet not at a bound

The paper (Qiu et al. 2024) reports that TempNet gives higher temperatures where the next token is more
uncertain. Here, a tiny GPT on the embedded corpus (the Python standard library's .py files), two arms:
  joint   LM and TempNet trained together from scratch with the DRO loss (the paper's from-scratch setting);
  frozen  the LM trained first with plain cross-entropy (no TempNet), then TempNet alone on the frozen LM with the
          DRO loss (TempNet on a trained model);
then on held-out files, for every token:
  tau       TempNet's temperature
  H         the next-token entropy: the entropy of the LM's next-token distribution softmax(z) (nats)   [primary]
  H_tau     the entropy of the tempered prediction softmax(z / tau)                                     [secondary]
and the Spearman rank correlation of tau with H (and with H_tau, and with the next token's cross-entropy), with
scipy when installed, else ranks by hand (average ranks for ties, then Pearson). The same is measured before
TempNet is trained (its initialisation: on the untrained LM for joint, on the trained LM for frozen) as a
control. These definitions were fixed before any run.

What to expect from the loss itself: per token, dL/dtau = rho - KL(softmax(z/tau) || uniform) = H_tau - (log V - rho)
(docs/design.md), whatever the target token. At TempNet's optimum the tempered entropy H_tau is pulled to log V - rho,
so tau is raised where softmax(z) is sharp (low H) and lowered where it is flat (high H): the DRO objective
itself favours a NEGATIVE rank correlation between tau and H for fixed logits. The benchmark measures what a
trained TempNet does. With the reference's target (2.83 nats) a tiny LM, whose entropies are far higher, drives
tau towards its lower bound; --frozen-target lm aims the frozen arm at the LM's own mean entropy on training
windows instead, so TempNet has room to rank tokens.

Data: files held out by a hash of their path (the corpus module's rule, --holdout-fraction 0.05); a sentencepiece
tokenizer (--vocab-size 1024) trained on the training files only; training windows of seq_length + 1 tokens from
the training files (the first --train-tokens of them); held-out windows from the held-out files (the first
--eval-tokens tokens). DRO settings as in benchmarks/tempnet_ablation.py: rho = log V - 2.83 (the reference's
target entropy), tau in [0.5, 5.0]. TempNet's learning rate --tempnet-lr 1e-2: a first run at 1e-3 (joint arm,
400 steps) left tau within 4e-4 of a constant, too little to rank anything (its table is kept in the results).

Output: a JSON line on stdout; <prefix>.json (figures), <prefix>.md (table and verdict), <prefix>.png (tau
against H per arm, with binned medians). Default prefix benchmarks/results/tempnet_entropy.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from benchmarks._shared import git_commit  # noqa: E402

DEFAULT_PREFIX = os.path.join(REPO, "benchmarks", "results", "tempnet_entropy")
DEFAULT_WORK = os.path.join(REPO, "runs", "tempnet_entropy")
TARGET_ENTROPY_GPT = 2.83  # log V - rho of the GPT-2 reference (rho = 8.0 at V = 50304)
TAU_MIN, TAU_MAX = 0.5, 5.0  # the GPT-2 reference's bounds


# -- statistics ------------------------------------------------------------------------------------------------


def ranks(values: Sequence[float]) -> List[float]:
    """Ranks 1..n, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        avg = (i + j) / 2 + 1
        for k in range(i, j + 1):
            out[order[k]] = avg
        i = j + 1
    return out


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (scipy.stats.spearmanr when scipy is installed)."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError("spearman needs two sequences of the same length >= 2")
    try:
        from scipy.stats import spearmanr
    except ImportError:
        return pearson(ranks(x), ranks(y))
    return float(spearmanr(x, y).correlation)


def binned_medians(x: Sequence[float], y: Sequence[float], bins: int = 12) -> List[tuple]:
    """(bin centre of x, median of y, count) over equal-count bins of x."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    out = []
    for b in range(bins):
        part = order[b * len(order) // bins:(b + 1) * len(order) // bins]
        if not part:
            continue
        ys = sorted(y[i] for i in part)
        out.append((sum(x[i] for i in part) / len(part), ys[len(ys) // 2], len(part)))
    return out


# -- data ------------------------------------------------------------------------------------------------------


def prepare_data(args) -> dict:
    """Tokenizer (trained on the training files, cached in the work dir) and token streams."""
    import torch

    from megatron_tempnet.data.corpus import is_heldout, read_source, stdlib_root, stdlib_source_files
    from megatron_tempnet.data.tokenizer import load_tokenizer, train_sentencepiece

    root = stdlib_root()
    train_texts, held_texts = [], []
    for p in stdlib_source_files(root):
        text = read_source(p)
        if not text or not text.strip():
            continue
        (held_texts if is_heldout(p.relative_to(root).as_posix(), args.holdout_fraction) else train_texts).append(text)
    os.makedirs(args.work_dir, exist_ok=True)
    prefix = os.path.join(args.work_dir, f"tokenizer_{args.vocab_size}_h{args.holdout_fraction}")
    if not os.path.isfile(prefix + ".model"):
        train_sentencepiece(iter(train_texts), prefix, args.vocab_size, max_input_mb=args.tokenizer_mb)
    tok = load_tokenizer(prefix + ".model")

    def stream(texts, limit):
        ids: List[int] = []
        for t in texts:
            ids.extend(tok.tokenize(t) + [tok.eod])
            if len(ids) >= limit:
                break
        return torch.tensor(ids[:limit], dtype=torch.long)

    return {"tokenizer": tok, "tokenizer_path": prefix + ".model", "train": stream(train_texts, args.train_tokens),
            "heldout": stream(held_texts, args.eval_tokens), "train_files": len(train_texts),
            "heldout_files": len(held_texts)}


class Windows:
    """Map-style dataset of consecutive windows of seq_length + 1 tokens (the trainer's item format)."""

    def __init__(self, ids, seq_length: int):
        import torch

        n = (len(ids) - 1) // seq_length
        self.ids, self.s, self.n, self.torch = ids, seq_length, n, torch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        w = self.ids[i * self.s: i * self.s + self.s + 1]
        return {"tokens": w[:-1], "labels": w[1:], "loss_mask": self.torch.ones(self.s)}


def config(args, vocab_size: int, tempnet: bool = True, steps: Optional[int] = None, mode: str = "scratch",
           pretrained: Optional[str] = None):
    from megatron_tempnet.config import Config

    cfg = Config()
    m, t, tn = cfg.model, cfg.train, cfg.tempnet
    m.arch, m.num_layers, m.hidden_size, m.num_attention_heads = "gpt", args.num_layers, args.hidden_size, 4
    m.seq_length, m.vocab_size, m.transformer_impl = args.seq_length, vocab_size, "local"
    cfg.data.mock_data = True  # the windows come from memory, not from files
    t.micro_batch_size = t.global_batch_size = args.batch_size
    steps = steps or args.steps
    t.train_iters, t.lr, t.min_lr, t.lr_warmup_iters = steps, args.lr, args.lr / 10, max(steps // 50, 1)
    t.eval_interval, t.precision, t.seed, t.mode = 0, "fp32", args.seed, mode
    cfg.checkpoint.pretrained_checkpoint = pretrained
    tn.enabled, tn.hidden_size, tn.tau_min, tn.tau_max = tempnet, args.tempnet_hidden_size, TAU_MIN, TAU_MAX
    tn.lr, tn.min_lr = args.tempnet_lr, args.tempnet_lr / 10
    cfg.loss.dro_rho = math.log(vocab_size) - TARGET_ENTROPY_GPT
    cfg.logging.log_interval = 10**9
    return cfg


def measure(model_chunk, heldout, seq_length: int, vocab_size: int, batch: int = 16) -> Dict[str, list]:
    """Per held-out token: tau, H (entropy of softmax(z)), H_tau (of softmax(z / tau)), CE at tau = 1."""
    import torch
    import torch.nn.functional as F

    from megatron_tempnet import runtime
    from megatron_tempnet.models.build import causal_mask
    from megatron_tempnet.models.build import unwrap

    model = unwrap(model_chunk)
    was_training = model.training
    model.eval()
    ds = Windows(heldout, seq_length)
    out = {"tau": [], "H": [], "H_tau": [], "ce": [], "ce_tau": []}
    mask = causal_mask(seq_length, runtime.device())
    try:
        with torch.no_grad():
            for i in range(0, len(ds), batch):
                items = [ds[j] for j in range(i, min(i + batch, len(ds)))]
                tokens = torch.stack([it["tokens"] for it in items])
                labels = torch.stack([it["labels"] for it in items])
                pos = torch.arange(seq_length).unsqueeze(0).expand_as(tokens)
                with runtime.native_torch():
                    logits, tau = model(tokens, pos, mask)
                z = logits[..., :vocab_size].double()
                if tau is None:  # an LM without TempNet: tau = 1
                    tau = torch.ones(z.shape[:-1], dtype=z.dtype)
                logp = F.log_softmax(z, -1)
                logp_tau = F.log_softmax(z / tau.double().unsqueeze(-1), -1)
                out["tau"] += tau.flatten().tolist()
                out["H"] += (-(logp.exp() * logp).sum(-1)).flatten().tolist()
                out["H_tau"] += (-(logp_tau.exp() * logp_tau).sum(-1)).flatten().tolist()
                out["ce"] += (-logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)).flatten().tolist()
                out["ce_tau"] += (-logp_tau.gather(-1, labels.unsqueeze(-1)).squeeze(-1)).flatten().tolist()
    finally:
        model.train(was_training)
    return out


def summarize(m: Dict[str, list]) -> dict:
    tau = m["tau"]
    mean = sum(tau) / len(tau)
    return {
        "tokens": len(tau),
        "spearman_tau_H": spearman(tau, m["H"]),
        "spearman_tau_H_tau": spearman(tau, m["H_tau"]),
        "spearman_tau_ce": spearman(tau, m["ce"]),
        "pearson_tau_H": pearson(tau, m["H"]),
        "tau_mean": mean, "tau_std": math.sqrt(sum((t - mean) ** 2 for t in tau) / len(tau)),
        "tau_min": min(tau), "tau_max": max(tau),
        "H_mean": sum(m["H"]) / len(tau), "H_tau_mean": sum(m["H_tau"]) / len(tau),
        "ce_mean": sum(m["ce"]) / len(tau), "ce_tau_mean": sum(m["ce_tau"]) / len(tau),
    }


ARM_TITLES = {"joint": "joint: LM + TempNet from scratch (DRO)", "frozen": "frozen: TempNet on the trained LM (DRO)"}


def plot(measured: Dict[str, Dict[str, list]], stats: Dict[str, dict], path: str) -> None:
    import random

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(measured)
    fig, axes = plt.subplots(1, len(arms), figsize=(5.6 * len(arms), 4.4), squeeze=False)
    for ax, arm in zip(axes[0], arms):
        m, s = measured[arm], stats[arm]["trained"]
        idx = list(range(len(m["tau"])))
        random.Random(0).shuffle(idx)
        idx = idx[:6000]
        ax.scatter([m["H"][i] for i in idx], [m["tau"][i] for i in idx], s=3, alpha=0.25, color="#4575b4",
                   linewidths=0)
        med = binned_medians(m["H"], m["tau"])
        ax.plot([b[0] for b in med], [b[1] for b in med], color="#d73027", lw=2, marker="o", ms=4,
                label="median tau per entropy bin")
        ax.set_xlabel("next-token entropy H of softmax(z) (nats)")
        ax.set_ylabel("TempNet tau")
        ax.set_title(f"{ARM_TITLES[arm]}\nSpearman {s['spearman_tau_H']:+.3f} "
                     f"(before TempNet training {stats[arm]['init']['spearman_tau_H']:+.3f})", fontsize=10)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle("TempNet temperature vs next-token entropy, held-out stdlib files")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _varies(t: dict) -> bool:
    return t["tau_max"] - t["tau_min"] >= 1e-3 * max(abs(t["tau_mean"]), 1.0)


def verdict(s: dict, arm: str = "") -> str:
    r = s["trained"]["spearman_tau_H"]
    r0 = s["init"]["spearman_tau_H"]
    if r > 0.1:
        what = "positively (the paper's claim holds here)"
    elif r < -0.1:
        what = "negatively (the opposite of the paper's claim, at this scale)"
    else:
        what = "hardly at all (|rho| <= 0.1)"
    out = (f"{(arm + ': ') if arm else ''}after training, TempNet's temperature correlates {what} with the next-token "
           f"entropy: Spearman {r:+.3f} over {s['trained']['tokens']} held-out tokens (before TempNet's training: {r0:+.3f}).")
    t = s["trained"]
    margin = 0.02 * (TAU_MAX - TAU_MIN)
    if t["tau_max"] < TAU_MIN + margin or t["tau_min"] > TAU_MAX - margin:
        bound = TAU_MIN if t["tau_max"] < TAU_MIN + margin else TAU_MAX
        out += (f" Note: tau sits at its bound {bound} (range {t['tau_min']:.4f} .. {t['tau_max']:.4f}): the ranking is "
                "among small differences of a saturated TempNet.")
    if not _varies(t):
        out += (f" Caution: tau hardly varies (range {t['tau_min']:.6f} .. {t['tau_max']:.6f}), so this ranking "
                "is of differences near float rounding, not of a learned per-token temperature.")
    return out


ROWS = [("Spearman(tau, H)   [primary]", "spearman_tau_H", "{:+.3f}"),
        ("Spearman(tau, H_tau)", "spearman_tau_H_tau", "{:+.3f}"),
        ("Spearman(tau, CE of the next token)", "spearman_tau_ce", "{:+.3f}"),
        ("Pearson(tau, H)", "pearson_tau_H", "{:+.3f}"),
        ("tau mean / std", ("tau_mean", "tau_std"), "{:.3f} / {:.3f}"),
        ("tau min / max", ("tau_min", "tau_max"), "{:.3f} / {:.3f}"),
        ("mean H / H_tau (nats)", ("H_mean", "H_tau_mean"), "{:.3f} / {:.3f}"),
        ("held-out CE at tau = 1 / at TempNet's tau (nats)", ("ce_mean", "ce_tau_mean"), "{:.3f} / {:.3f}")]


def _cell(d: dict, key, fmt: str) -> str:
    return fmt.format(*(d[k] for k in key)) if isinstance(key, tuple) else fmt.format(d[key])


def markdown_table(stats: Dict[str, dict]) -> str:
    cols = [(arm, phase) for arm in stats for phase in ("trained", "init")]
    names = {"trained": "trained", "init": "before TempNet training"}
    lines = ["| held-out tokens: " + str(next(iter(stats.values()))["trained"]["tokens"]) + " | "
             + " | ".join(f"{arm}: {names[phase]}" for arm, phase in cols) + " |", "|---" * (1 + len(cols)) + "|"]
    for label, key, fmt in ROWS:
        lines.append(f"| {label} | " + " | ".join(_cell(stats[a][p], key, fmt) for a, p in cols) + " |")
    return "\n".join(lines)


def write_markdown(path: str, res: dict) -> None:
    s = res["settings"]
    lines = ["# TempNet temperature vs next-token entropy\n",
             f"`{res['command']}`  ", f"{res['date']}, commit {res['commit']}, {res['seconds']:.0f} s\n"]
    lines += [f"- {v}" for v in res["verdicts"]]
    lines += ["", markdown_table(res["stats"]), "",
              "H: entropy of the LM's next-token distribution softmax(z); H_tau: of the tempered softmax(z / tau); "
              f"CE: cross-entropy of the actual next token. Spearman by {res['spearman_impl']}.", "",
              "Why the sign can be negative: the DRO loss's gradient in tau is H_tau - (log V - rho) for every token, "
              "so its optimum raises tau where softmax(z) is sharp and lowers it where it is flat (see the script's "
              "docstring).", "",
              f"Model: GPT, {s['num_layers']} layers, hidden {s['hidden_size']}, seq {s['seq_length']}, vocabulary "
              f"{res['vocab_size']} (sentencepiece on the training files); TempNet hidden {s['tempnet_hidden_size']}, "
              f"tau in [0.5, 5.0], rho = log V - target entropy (joint: {TARGET_ENTROPY_GPT}), TempNet lr {s['tempnet_lr']}; LM {s['steps']} "
              f"steps x {s['batch_size']} windows, LM lr {s['lr']}; frozen arm: TempNet {s['tempnet_steps']} steps on "
              f"the frozen LM (target entropy: {s['frozen_target']}"
              + (f", {s['frozen_target_entropy']:.3f} nats" if s.get("frozen_target_entropy") else f", {TARGET_ENTROPY_GPT}")
              + f"); seed {s['seed']}. Data: {res['train_files']} training files ({res['train_tokens']} tokens), "
              f"{res['heldout_files']} held-out files ({res['heldout_tokens']} tokens evaluated).", "",
              f"Picture: {os.path.basename(res['png'])}"]
    for note in res.get("notes", []):
        lines += ["", note]
    if res.get("previous"):
        previous = "\n".join(("###" + line[1:]) if line.startswith("# ") else line
                             for line in res["previous"].splitlines())
        lines += ["", "## The first run (TempNet lr 1e-3, joint arm only)\n", previous]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def run_joint(args, data, vocab, log) -> tuple:
    from megatron_tempnet.training.in_process import train_lm

    captured = {}
    cfg = config(args, vocab)
    model, _ = train_lm(cfg, Windows(data["train"], args.seq_length), log,
                        before_training=lambda m, _o: captured.update(
                            init=measure(m[0], data["heldout"], args.seq_length, vocab)))
    return measure(model[0], data["heldout"], args.seq_length, vocab), captured["init"]


def run_frozen(args, data, vocab, log) -> tuple:
    """The LM with cross-entropy (no TempNet), saved; then TempNet alone on it (--mode frozen_lm)."""
    from megatron_tempnet.checkpoint import load_model_weights, save_checkpoint
    from megatron_tempnet.training.in_process import train_lm

    cfg = config(args, vocab, tempnet=False)
    model, _ = train_lm(cfg, Windows(data["train"], args.seq_length), log)
    ckpt = os.path.join(args.work_dir, f"frozen_lm_{os.getpid()}")
    save_checkpoint(cfg, args.steps, 0, model, save_dir=ckpt, keep_last=1)
    captured = {}

    def load_lm(m, optimizer):
        load_model_weights(ckpt, m, cfg2)
        optimizer.reload_model_params()
        captured["init"] = measure(m[0], data["heldout"], args.seq_length, vocab)

    cfg2 = config(args, vocab, steps=args.tempnet_steps, mode="frozen_lm", pretrained=ckpt)
    if args.frozen_target == "lm":  # aim the tempered entropy at the frozen LM's own mean entropy (training windows)
        train_h = measure(model[0], data["train"][: 64 * args.seq_length + 1], args.seq_length, vocab)["H"]
        cfg2.loss.dro_rho = math.log(vocab) - sum(train_h) / len(train_h)
        captured["target_entropy"] = sum(train_h) / len(train_h)
        log(f"frozen arm: target entropy {captured['target_entropy']:.3f} nats (rho = {cfg2.loss.dro_rho:.3f})")
    model, _ = train_lm(cfg2, Windows(data["train"], args.seq_length), log, before_training=load_lm)
    import shutil

    shutil.rmtree(ckpt, ignore_errors=True)
    if "target_entropy" in captured:
        args.frozen_target_entropy = captured["target_entropy"]
    return measure(model[0], data["heldout"], args.seq_length, vocab), captured["init"]


def _parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--tempnet-hidden-size", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--tempnet-lr", type=float, default=1e-2)
    p.add_argument("--arms", nargs="+", default=["joint", "frozen"], choices=["joint", "frozen"])
    p.add_argument("--tempnet-steps", type=int, default=200, help="TempNet's steps on the frozen LM (frozen arm)")
    p.add_argument("--frozen-target", choices=("reference", "lm"), default="reference",
                   help="frozen arm's target entropy log V - rho: the reference's 2.83 nats, or the frozen LM's own mean "
                        "next-token entropy on training windows (so tau is not pushed to a bound)")
    p.add_argument("--keep-previous", action="store_true",
                   help="carry the first run's table (in <prefix>.md under 'The first run') into the new file")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--holdout-fraction", type=float, default=0.05)
    p.add_argument("--train-tokens", type=int, default=2_000_000)
    p.add_argument("--eval-tokens", type=int, default=40_000)
    p.add_argument("--tokenizer-mb", type=float, default=4.0, help="MB of training text read by the tokenizer trainer")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--work-dir", default=DEFAULT_WORK, help="tokenizer cache")
    p.add_argument("--output-prefix", default=DEFAULT_PREFIX)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from megatron_tempnet import runtime

    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    data = prepare_data(args)
    vocab = data["tokenizer"].vocab_size
    log(f"data: {data['train_files']} training files ({len(data['train'])} tokens), {data['heldout_files']} "
        f"held-out files ({len(data['heldout'])} tokens), vocabulary {vocab}")
    measured, stats = {}, {}
    try:
        for arm in args.arms:
            log(f"== arm {arm}")
            trained, init = (run_joint if arm == "joint" else run_frozen)(args, data, vocab, log)
            measured[arm] = trained
            stats[arm] = {"trained": summarize(trained), "init": summarize(init)}
            log(verdict(stats[arm], arm))
    finally:
        runtime.destroy_distributed()
    try:
        import scipy  # noqa: F401

        impl = "scipy.stats.spearmanr"
    except ImportError:
        impl = "average ranks + Pearson (scipy not installed)"
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    png = args.output_prefix + ".png"
    plot(measured, stats, png)
    previous = None
    if args.keep_previous and os.path.isfile(args.output_prefix + ".md"):
        old = open(args.output_prefix + ".md").read()
        previous = old.split("## The first run", 1)[1].split("\n", 2)[2] if "## The first run" in old else old
    res = {"stats": stats, "verdicts": [verdict(stats[a], a) for a in args.arms], "settings": vars(args),
           "vocab_size": vocab, "train_files": data["train_files"], "heldout_files": data["heldout_files"],
           "train_tokens": len(data["train"]), "heldout_tokens": len(data["heldout"]), "spearman_impl": impl,
           "command": "python benchmarks/tempnet_entropy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "commit": git_commit(),
           "seconds": time.perf_counter() - t0, "png": png, "previous": previous,
           "binned_medians": {a: binned_medians(measured[a]["H"], measured[a]["tau"]) for a in args.arms}}
    with open(args.output_prefix + ".json", "w") as f:
        json.dump(res, f, indent=1)
    write_markdown(args.output_prefix + ".md", res)
    print(json.dumps({"benchmark": "tempnet_entropy",
                      **{f"spearman_tau_H_{a}": stats[a]["trained"]["spearman_tau_H"] for a in args.arms},
                      **{f"spearman_tau_H_{a}_before": stats[a]["init"]["spearman_tau_H"] for a in args.arms},
                      **{f"tau_varies_{a}": _varies(stats[a]["trained"]) for a in args.arms},
                      "tokens": next(iter(stats.values()))["trained"]["tokens"],
                      "seconds": round(res["seconds"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
