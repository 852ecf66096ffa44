#!/usr/bin/env python
r"""Does the shipped TempNet recipe learn a per-token temperature, and does it help? Three settings, three seeds.

    python benchmarks/tempnet_recipe.py                          # embedded corpus, ~30-50 min on 2 CPU cores
    python benchmarks/tempnet_recipe.py --corpus my.jsonl        # any JSONL with a "text" field
    python benchmarks/tempnet_recipe.py --scale gpu              # a larger model, for a GPU

Per seed, one process (a 1-rank group; megatron-core's state is rebuilt per run inside it):
  baseline  a small LLaMA trained with plain cross-entropy;
  frozen    the paper's LLaMA-2 setting: TempNet alone on the frozen baseline LM, with the DRO objective and with
            the tau-scaled cross-entropy CE(z / tau), each input variant (normalized, max_shifted, normalized + the
            logit scale: --tempnet-scale-input);
  scratch   LM and TempNet trained together from the baseline's initial weights and data order, DRO objective;
  finetune  LM and TempNet trained together from the baseline LM, DRO objective.
Every TempNet arm uses the shipped recipe (README "TempNet recipe"): tau_init 1.0, TempNet lr 3e-3 constant after
warm-up, tau in [0.01, 2] (the LLaMA reference's bounds), and a target entropy the tempered predictions can reach:
the baseline LM's own mean next-token entropy on training windows (so tau* is centred near 1 and TempNet's job
is to spread it over the tokens).

Data: documents split by a hash of their "path"/"id" field (else their text) into held-out (--holdout-fraction),
validation (the same fraction of the remaining documents, under another hash) and training; the sentencepiece
tokenizer is trained on the training documents only. Nothing is chosen on the held-out documents: the
validation split is reported beside them, and the best global temperature is fitted on training windows.

Metrics, on --eval-windows held-out windows of seq_length + 1 tokens (and --valid-windows validation windows):
  heldout_nll_tau1 / heldout_nll_own_tau / heldout_nll_best_global   NLL at tau = 1, with TempNet's tau, and with
      the single global temperature T that minimises the NLL of the arm's own LM on training windows;
  heldout_ece_*                                                      ECE of the top-1 prediction, 15 bins, same three;
  tau_std, tau_p5/p50/p95, frac_at_min/max, tau_opt_mean, spearman_tau_opt, spearman_tau_entropy, logit_scale
      (models/tempnet_diagnostics.py) on the first --diagnosed-windows held-out windows.

Output: one JSON line per (setting, arm, seed) on stdout and in <prefix>.jsonl; <prefix>.md (means and standard
deviations, the frozen-setting checks per seed, a plain verdict); <prefix>.png (tau against tau* and against the
next-token entropy, frozen DRO arms, first seed). Default prefix benchmarks/results/tempnet_recipe.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import sys
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from benchmarks._shared import git_commit, heldout_windows, run_workers, single_rank_worker, spread_subset  # noqa: E402
from benchmarks.tempnet_ablation import CalibrationBins, compare, mean_sd, prediction_stats  # noqa: E402

DEFAULT_PREFIX = os.path.join(REPO, "benchmarks", "results", "tempnet_recipe")
DEFAULT_WORK = os.path.join(REPO, "runs", "tempnet_recipe")

# The shipped recipe (examples/configs, README "TempNet recipe").
RECIPE = dict(tau_min=0.01, tau_max=2.0, tau_init=1.0, tempnet_lr=3e-3, tempnet_lr_schedule="constant")
VARIANTS = {"normalized": [], "max_shifted": ["--tempnet-input-variant", "max_shifted"],
            "scale": ["--tempnet-scale-input"]}
FROZEN_ARMS = [f"{objective}/{variant}" for objective in ("dro", "tau_ce") for variant in VARIANTS]

SCALES = {
    "cpu": dict(num_layers=4, hidden_size=128, num_attention_heads=4, seq_length=128, micro_batch_size=16,
                global_batch_size=16, lm_iters=300, lr=2e-3, min_lr=2e-4, lr_warmup_iters=20, vocab_size=4096,
                tempnet_hidden_size=128, tempnet_iters=300, finetune_iters=150, eval_windows=128, valid_windows=64,
                diagnosed_windows=64, fit_windows=32),
    "gpu": dict(num_layers=12, hidden_size=768, num_attention_heads=12, seq_length=1024, micro_batch_size=8,
                global_batch_size=64, lm_iters=5000, lr=6e-4, min_lr=6e-5, lr_warmup_iters=100, vocab_size=32000,
                tempnet_hidden_size=256, tempnet_iters=2000, finetune_iters=1000, eval_windows=512,
                valid_windows=256, diagnosed_windows=64, fit_windows=128),
    "test": dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, micro_batch_size=4,
                 global_batch_size=4, lm_iters=6, lr=1e-2, min_lr=1e-3, lr_warmup_iters=1, vocab_size=250,
                 tempnet_hidden_size=16, tempnet_iters=60, finetune_iters=4, eval_windows=16, valid_windows=8,
                 diagnosed_windows=8, fit_windows=8),
}


# -- data -------------------------------------------------------------------------------------------------------

def _doc_key(doc: dict) -> str:
    return str(doc.get("path", doc.get("id", doc.get("text", ""))))


def split_documents(corpus: str, out_dir: str, fraction: float) -> Dict[str, str]:
    """train / valid / heldout JSONL files: held out by a hash of the document's key, then the validation
    documents by a hash of the key under another salt, so each split is stable as documents come and go."""
    from megatron_tempnet.data.corpus import is_heldout

    paths = {side: os.path.join(out_dir, f"{side}.jsonl") for side in ("train", "valid", "heldout")}
    if all(os.path.isfile(p) for p in paths.values()):
        return paths
    files = {side: open(p + ".tmp", "w", encoding="utf-8") for side, p in paths.items()}
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            key = _doc_key(json.loads(line))
            side = ("heldout" if is_heldout(key, fraction) else
                    "valid" if is_heldout(key + "#validation", fraction) else "train")
            files[side].write(line if line.endswith("\n") else line + "\n")
    for side, fh in files.items():
        fh.close()
        os.replace(paths[side] + ".tmp", paths[side])
    return paths


def prepare_data(args, vocab_size: int) -> dict:
    """Corpus -> split by document -> tokenizer (training documents) -> indexed datasets; reused when present."""
    if args.mock_data:
        return {"mock": True, "description": "synthetic tokens (smoke tests only)"}
    from megatron_tempnet.data.corpus import write_stdlib_corpus
    from megatron_tempnet.data.inputs import iter_texts
    from megatron_tempnet.data.preprocess import PreprocessConfig, preprocess
    from megatron_tempnet.data.tokenizer import train_sentencepiece

    name = "stdlib" if args.corpus == "stdlib" else os.path.splitext(os.path.basename(args.corpus))[0]
    out_dir = os.path.join(args.work_dir, f"data_{name}_v{vocab_size}_h{args.holdout_fraction:g}")
    os.makedirs(out_dir, exist_ok=True)
    corpus = args.corpus
    if corpus == "stdlib":
        corpus = os.path.join(out_dir, "stdlib.jsonl")
        if not os.path.isfile(corpus):
            write_stdlib_corpus(corpus)
    splits = split_documents(corpus, out_dir, args.holdout_fraction)
    tok = os.path.join(out_dir, f"tokenizer_{vocab_size}")
    if not os.path.isfile(tok + ".model"):
        train_sentencepiece(iter_texts([splits["train"]]), tok, vocab_size)
    data = {"tokenizer": tok + ".model", "vocab_size": vocab_size,
            "description": f"{args.corpus}: {args.holdout_fraction:g} of the documents held out and as much again "
                           "for validation, by hash of path/id/text"}
    for side, src in splits.items():
        man = preprocess(PreprocessConfig(inputs=[src], output_prefix=os.path.join(out_dir, side),
                                          tokenizer=tok + ".model", append_eod=True, workers=0))
        data[side] = [os.path.join(out_dir, p) for p in man["prefixes"]["text"]]
        data[f"{side}_docs"] = man["counts"]["docs"]
    return data


# -- one seed (inside a fresh process) ---------------------------------------------------------------------------

def _flags(s: dict, data: dict, seed: int, iters: int, extra: List[str]) -> List[str]:
    flags = ["--arch", "llama", "--num-layers", str(s["num_layers"]), "--hidden-size", str(s["hidden_size"]),
             "--num-attention-heads", str(s["num_attention_heads"]), "--num-query-groups",
             str(max(1, s["num_attention_heads"] // 2)), "--seq-length", str(s["seq_length"]),
             "--micro-batch-size", str(s["micro_batch_size"]), "--global-batch-size", str(s["global_batch_size"]),
             "--train-iters", str(iters), "--lr", repr(s["lr"]), "--min-lr", repr(s["min_lr"]),
             "--lr-warmup-iters", str(s["lr_warmup_iters"]), "--eval-interval", "0", "--seed", str(seed),
             "--log-interval", "1000000000", "--loss-impl", "reference",
             "--tempnet-hidden-size", str(s["tempnet_hidden_size"]), "--tempnet-tau-min", repr(RECIPE["tau_min"]),
             "--tempnet-tau-max", repr(RECIPE["tau_max"]), "--tempnet-tau-init", repr(RECIPE["tau_init"]),
             "--tempnet-lr", repr(RECIPE["tempnet_lr"]), "--tempnet-lr-schedule", RECIPE["tempnet_lr_schedule"]]
    if data.get("mock"):
        flags += ["--mock-data", "--vocab-size", str(s["vocab_size"])]
    else:
        flags += ["--data-path", *data["train"], "--tokenizer-model", data["tokenizer"], "--split", "100,0,0"]
    return flags + extra


def _train(cfg, lm_state: Optional[dict]) -> tuple:
    """Train cfg.train.train_iters steps (from lm_state's LM weights when given). Returns (model chunk, seconds)."""
    from benchmarks._shared import train_dataset
    from megatron_tempnet.finalize import resolve
    from megatron_tempnet.models.build import unwrap
    from megatron_tempnet.training.loop import data_iterators, setup_run
    from megatron_tempnet.training.step import train_step

    cfg = resolve(cfg).cfg  # the vocabulary from the tokenizer, the optimizer choice
    model, optimizer, scheduler = setup_run(cfg)
    if lm_state is not None:
        missing, unexpected = unwrap(model[0]).load_state_dict(lm_state, strict=False)
        if unexpected or any(not k.startswith("tempnet.") for k in missing):
            raise RuntimeError(f"LM weights do not fit: missing {missing}, unexpected {unexpected}")
        optimizer.reload_model_params()
    iters = data_iterators(cfg, train_dataset(cfg, shuffle_seed=cfg.train.seed), 0, len(model))
    t0 = time.perf_counter()
    for _ in range(cfg.train.train_iters):
        train_step(cfg, model, optimizer, scheduler, iters)
    return unwrap(model[0]), time.perf_counter() - t0


def _logits(model, windows, batch: int):
    """(logits [n, V] over the true vocabulary, tau [n] or None, labels [n]) of every window's positions."""
    import torch

    from megatron_tempnet.inference.model import forward

    zs, taus = [], []
    model.eval()
    for i in range(0, windows.size(0), batch):
        z, tau = forward(model, windows[i:i + batch, :-1])
        zs.append(z.reshape(-1, z.size(-1)))
        taus.append(None if tau is None else tau.reshape(-1))
    model.train()
    return torch.cat(zs), (None if taus[0] is None else torch.cat(taus)), windows[:, 1:].reshape(-1)


def best_global_temperature(z, labels) -> float:
    """argmin_T mean CE(z / T, y): golden-section search on beta = 1/T in [0.02, 50] (CE(beta z) is convex in beta)."""
    import torch

    def nll(beta: float) -> float:
        return float(torch.nn.functional.cross_entropy(z * beta, labels))

    lo, hi = math.log(0.02), math.log(50.0)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(math.exp(a)), nll(math.exp(b))
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(math.exp(b))
    return 1.0 / math.exp((lo + hi) / 2)


def _nll_ece(z, tau, labels) -> tuple:
    conf, pred, ce = prediction_stats(z, tau, labels)
    bins = CalibrationBins()
    bins.add(conf, pred == labels)
    return float(ce.double().mean()), bins.ece()


def evaluate(model, s: dict, windows: dict, target: Optional[float]) -> dict:
    """The row's metrics for one trained model (module docstring)."""
    import torch

    from megatron_tempnet.models import tempnet_diagnostics as diag

    z_fit, _, y_fit = _logits(model, windows["fit"], s["micro_batch_size"])
    temperature = best_global_temperature(z_fit, y_fit)
    out = {"best_global_T": temperature}
    for split in ("heldout", "valid"):
        z, tau, y = _logits(model, windows[split], s["micro_batch_size"])
        own = torch.ones_like(y, dtype=torch.float32) if tau is None else tau
        for name, t in (("tau1", None), ("own_tau", own), ("best_global", torch.full_like(own, temperature))):
            nll, ece = _nll_ece(z, t, y)
            out[f"{split}_nll_{name}"], out[f"{split}_ece_{name}"] = nll, ece
        if split == "heldout":
            n = windows["diagnosed"] * windows[split].size(1) - windows["diagnosed"]
            zd, td = z[:n], own[:n]
            v = z.size(-1)
            tau_opt = diag.optimal_tau(zd, target, RECIPE["tau_min"], RECIPE["tau_max"], v) if target else None
            entropy = diag.tempered_entropy(zd, torch.ones_like(td), v)
            out.update(spearman_tau_opt=float("nan"))  # no target: no tau* (the baseline)
            out.update(diag.summarize(td, tau_opt, entropy, diag.logit_scale(zd, v), RECIPE["tau_min"], RECIPE["tau_max"]))
            out["tau_mean"] = float(td.double().mean())
            pick = torch.linspace(0, n - 1, min(n, 1500)).long()  # points for the plot
            out["points"] = {"tau": td[pick].tolist(), "entropy": entropy[pick].tolist(),
                             "tau_opt": tau_opt[pick].tolist() if tau_opt is not None else None}
    return out


def run_seed(spec: dict) -> dict:
    """Every (setting, arm) of one seed, in order; returns {"rows": [...]}."""
    import torch

    from megatron_tempnet.config import load_config
    from megatron_tempnet.models import tempnet_diagnostics as diag

    s, data, seed = spec["settings"], spec["data"], spec["seed"]
    windows = {"heldout": spread_subset(heldout_windows({"heldout": data["heldout"]} if not data.get("mock") else data,
                                                        s["seq_length"], s["vocab_size"]), s["eval_windows"])}
    windows["valid"] = spread_subset(heldout_windows({"heldout": data["valid"]} if not data.get("mock") else data,
                                                     s["seq_length"], s["vocab_size"]), s["valid_windows"])
    windows["fit"] = spread_subset(heldout_windows({"heldout": data["train"]} if not data.get("mock") else data,
                                                   s["seq_length"], s["vocab_size"]), s["fit_windows"])
    windows["diagnosed"] = min(s["diagnosed_windows"], windows["heldout"].size(0))
    rows = []

    def run(setting: str, arm: str, iters: int, extra: List[str], lm_state=None, target=None):
        cfg, _ = load_config(_flags(s, data, seed, iters, extra))
        if spec.get("cache_dir"):
            cfg.data.data_cache_path = os.path.join(spec["cache_dir"], f"{setting}_{arm.replace('/', '_')}")
        model, seconds = _train(cfg, lm_state)
        row = {"setting": setting, "arm": arm, "seed": seed, "train_iters": iters, "train_s": round(seconds, 1),
               "target_entropy": target, **evaluate(model, s, windows, target)}
        rows.append(row)
        print(f"[recipe] seed {seed} {setting} {arm}: tau std {row['tau_std']:.3f}, Spearman(tau, tau*) "
              f"{row.get('spearman_tau_opt', float('nan')):.3f}, held-out NLL tau=1 {row['heldout_nll_tau1']:.4f} "
              f"own {row['heldout_nll_own_tau']:.4f} global {row['heldout_nll_best_global']:.4f} ({seconds:.0f} s)",
              flush=True)
        return model

    base = run("baseline", "ce", s["lm_iters"], ["--no-tempnet-enabled"])
    lm_state = {k: (v.detach().clone() if hasattr(v, "detach") else v) for k, v in base.state_dict().items()
                if not k.startswith("tempnet.")}  # _extra_state entries may be None
    z_fit, _, _ = _logits(base, windows["fit"], s["micro_batch_size"])
    target = float(diag.tempered_entropy(z_fit, torch.ones(z_fit.size(0)), z_fit.size(-1)).mean())
    for arm in FROZEN_ARMS:
        objective, variant = arm.split("/")
        goal = ["--dro-target-entropy", repr(target)] if objective == "dro" else []
        run("frozen", arm, s["tempnet_iters"],
            ["--tempnet-enabled", "--mode", "frozen_lm", "--objective", objective, *goal, *VARIANTS[variant]],
            lm_state, target)
    dro = ["--tempnet-enabled", "--objective", "dro", "--dro-target-entropy", repr(target)]
    run("scratch", "dro/normalized", s["lm_iters"], dro, None, target)
    run("finetune", "dro/normalized", s["finetune_iters"],
        dro + ["--mode", "finetune"], lm_state, target)
    return {"rows": rows}



# -- summary ------------------------------------------------------------------------------------------------------

FROZEN_CHECKS = (("tau_std", ">=", 0.1), ("frac_at_bounds", "<", 0.2), ("spearman_tau_opt", ">=", 0.8))
TABLE = [("tau_std", "{:.3f}"), ("frac_at_bounds", "{:.3f}"), ("spearman_tau_opt", "{:.3f}"),
         ("spearman_tau_entropy", "{:.3f}"), ("heldout_nll_tau1", "{:.4f}"), ("heldout_nll_own_tau", "{:.4f}"),
         ("heldout_nll_best_global", "{:.4f}"), ("heldout_ece_tau1", "{:.4f}"), ("heldout_ece_own_tau", "{:.4f}"),
         ("heldout_ece_best_global", "{:.4f}"), ("valid_nll_own_tau", "{:.4f}")]


VERDICT_WORDS = {"better": "beats", "worse": "is worse than", "within 2 sd": "is within two standard deviations of",
                 "undecided": "is undecided (one seed) against"}


def _groups(rows: List[dict]) -> Dict[tuple, List[dict]]:
    out: Dict[tuple, List[dict]] = {}
    for r in rows:
        out.setdefault((r["setting"], r["arm"]), []).append(r)
    return out


def _cell(values: List[float], fmt: str) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    m, sd = mean_sd(values)
    return fmt.format(m) + ("" if math.isnan(sd) else " ± " + fmt.format(sd))


def verdicts(rows: List[dict]) -> List[str]:
    """Plain sentences: for each TempNet arm, its own-tau NLL against tau = 1 and the best global temperature
    (paired by seed; "beats" = better by more than two pooled seed standard deviations), and the frozen checks."""
    lines = []
    for (setting, arm), rs in _groups(rows).items():
        if setting == "baseline":
            continue
        own = [r["heldout_nll_own_tau"] for r in rs]
        for ref, label in (("heldout_nll_tau1", "tau = 1"), ("heldout_nll_best_global", "the best global temperature")):
            c = compare([r[ref] for r in rs], own)
            lines.append(f"- {setting} {arm}: held-out NLL with TempNet's tau {VERDICT_WORDS[c['verdict'].split(' (')[0]]} {label} "
                         f"({mean_sd(own)[0]:.4f} vs {mean_sd([r[ref] for r in rs])[0]:.4f}).")
        if setting in ("scratch", "finetune"):  # its own LM: against the cross-entropy baseline's, both modes
            base = [r["heldout_nll_tau1"] for r in rows if r["setting"] == "baseline"]
            for key, mode in (("heldout_nll_tau1", "at tau = 1"), ("heldout_nll_own_tau", "with its own tau")):
                c = compare(base, [r[key] for r in rs])
                lines.append(f"- {setting} {arm} against the cross-entropy baseline: held-out NLL {mode} "
                             f"{VERDICT_WORDS[c['verdict'].split(' (')[0]]} the baseline's "
                             f"({mean_sd([r[key] for r in rs])[0]:.4f} vs {mean_sd(base)[0]:.4f}).")
        if setting == "frozen" and arm.startswith("dro/"):
            fails = [f"seed {r['seed']}: {k} {r.get(k, float('nan')):.3f}" for r in rs for k, op, bound in FROZEN_CHECKS
                     if not (r.get(k, float("nan")) >= bound if op == ">=" else r.get(k, float("nan")) < bound)]
            lines.append(f"- {setting} {arm}: checks tau_std >= 0.1, fraction at a bound < 0.2, "
                         f"Spearman(tau, tau*) >= 0.8 at every seed: " + ("pass" if not fails else "FAIL (" + "; ".join(fails) + ")"))
    return lines


def summarize(rows: List[dict], meta: dict) -> str:
    out = [f"# TempNet recipe: {meta['settings']['scale']} scale, {len(meta['seeds'])} seeds", "",
           f"`{meta['command']}` at {meta['commit']}, {meta['date']}, {meta['host']}, {meta['wall_s'] / 60:.1f} min "
           f"(load average {meta['load'][0]:.1f} at the start, {meta['load'][1]:.1f} at the end).", "",
           f"Data: {meta['data']['description']}. Recipe: {json.dumps(RECIPE)}; DRO target entropy: the baseline LM's "
           "mean next-token entropy on training windows (per seed). Held-out metrics on "
           f"{meta['settings']['eval_windows']} windows, tau diagnostics on the first {meta['settings']['diagnosed_windows']}.",
           "", "| setting | arm | " + " | ".join(k for k, _ in TABLE) + " |", "|---|---|" + "---|" * len(TABLE)]
    for (setting, arm), rs in _groups(rows).items():
        out.append(f"| {setting} | {arm} | " + " | ".join(_cell([r.get(k) for r in rs], fmt) for k, fmt in TABLE) + " |")
    out += ["", "Verdicts (two pooled seed standard deviations):", ""] + verdicts(rows)
    return "\n".join(out) + "\n"


def plot(rows: List[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[recipe] matplotlib not installed: no plot", file=sys.stderr)
        return
    first = min(r["seed"] for r in rows)
    arms = [r for r in rows if r["seed"] == first and r["setting"] == "frozen" and r["arm"].startswith("dro/")]
    fig, axes = plt.subplots(2, len(arms), figsize=(4 * len(arms), 7), squeeze=False)
    for j, r in enumerate(arms):
        p = r["points"]
        axes[0][j].scatter(p["tau_opt"], p["tau"], s=3, alpha=0.4)
        axes[0][j].plot([0, 2], [0, 2], "k--", lw=0.8)
        axes[0][j].set(title=f"{r['arm']} (Spearman {r['spearman_tau_opt']:.2f})", xlabel="tau* (DRO optimum)",
                       ylabel="TempNet tau")
        axes[1][j].scatter(p["entropy"], p["tau"], s=3, alpha=0.4, color="tab:orange")
        axes[1][j].set(title=f"Spearman(tau, H) {r['spearman_tau_entropy']:.2f}", xlabel="next-token entropy H (nats)",
                       ylabel="TempNet tau")
    fig.suptitle(f"TempNet on a frozen LM, held-out tokens, seed {first}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=list(SCALES), default="cpu", help="model and run sizes (default cpu)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="default 1 2 3")
    p.add_argument("--corpus", default="stdlib", help="'stdlib' (the embedded corpus, default) or a JSONL file with 'text'")
    p.add_argument("--holdout-fraction", type=float, default=0.05, help="documents held out, and validation (default 0.05)")
    p.add_argument("--mock-data", action="store_true", help="synthetic tokens (smoke tests only)")
    p.add_argument("--jobs", type=int, default=2, help="seeds at a time, one process each (default 2)")
    p.add_argument("--work-dir", default=DEFAULT_WORK, help=f"data and caches (default {DEFAULT_WORK})")
    p.add_argument("--output-prefix", default=DEFAULT_PREFIX, help="writes .jsonl, .md, .png (default benchmarks/results/tempnet_recipe)")
    p.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    return p


def _run_seeds(args, settings: dict, data: dict) -> List[dict]:
    """One fresh process per seed, --jobs at a time; every row, each printed as it comes, in seed order."""
    threads = max(1, (os.cpu_count() or 1) // max(args.jobs, 1))
    specs = [{"name": f"seed{seed}", "seed": seed, "settings": settings, "data": data, "threads": threads,
              "cache_dir": os.path.join(args.work_dir, "index-cache", f"s{seed}")} for seed in args.seeds]
    rows: List[dict] = []
    for _, result, _ in run_workers(__file__, specs, args.jobs, os.path.join(args.work_dir, "logs"), "recipe"):
        for row in result["rows"]:
            row["frac_at_bounds"] = row["frac_at_min"] + row["frac_at_max"]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "points"}), flush=True)
    return sorted(rows, key=lambda r: r["seed"])


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return single_rank_worker(*args.worker, run_seed)
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    settings = dict(SCALES[args.scale], scale=args.scale)
    os.makedirs(args.work_dir, exist_ok=True)
    print(f"[recipe] preparing data ({'mock' if args.mock_data else args.corpus})", file=sys.stderr, flush=True)
    data = prepare_data(args, settings["vocab_size"])
    rows = _run_seeds(args, settings, data)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    with open(args.output_prefix + ".jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({k: v for k, v in row.items() if k != "points"}) + "\n")
    command = "python benchmarks/tempnet_recipe.py" + "".join(
        " " + shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    meta = {"settings": settings, "data": data, "seeds": args.seeds, "command": command, "commit": git_commit(),
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "host": f"{os.cpu_count()} CPU cores", "wall_s": time.perf_counter() - t0,
            "load": (load0, os.getloadavg()[0])}
    report = summarize(rows, meta)
    with open(args.output_prefix + ".md", "w") as f:
        f.write(report)
    plot(rows, args.output_prefix + ".png")
    print(report, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
