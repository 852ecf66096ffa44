"""The benchmarks' own arithmetic: Spearman's rank correlation by hand (ties included), binned medians, and the
adaptive benchmark's table and verdict inputs from fake per-prompt rows."""
import importlib.util
import math
import os
import random

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def te():
    return _load("tempnet_entropy")


def test_ranks_share_ties(te):
    assert te.ranks([10, 30, 20, 30]) == [1.0, 3.5, 2.0, 3.5]


def test_spearman_by_hand(te):
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert te.pearson(te.ranks(x), te.ranks([v ** 3 for v in x])) == pytest.approx(1.0)
    assert te.pearson(te.ranks(x), te.ranks([-v for v in x])) == pytest.approx(-1.0)
    rng = random.Random(0)
    a = [rng.random() for _ in range(50)]
    b = [v + rng.gauss(0, 0.3) for v in a]
    ra, rb = te.ranks(a), te.ranks(b)
    n = len(a)
    classic = 1 - 6 * sum((p - q) ** 2 for p, q in zip(ra, rb)) / (n * (n * n - 1))  # no ties
    assert te.pearson(ra, rb) == pytest.approx(classic)
    assert te.spearman(a, b) == pytest.approx(classic)
    assert math.isnan(te.pearson([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        te.spearman([1], [2])


def test_binned_medians(te):
    x = list(range(100))
    y = [2 * v for v in x]
    bins = te.binned_medians(x, y, bins=4)
    assert len(bins) == 4 and all(c == 25 for _, _, c in bins)
    assert [m for _, m, _ in bins] == [24, 74, 124, 174]  # the middle element of each bin of 25


def test_verdict_warns_when_tau_is_constant(te):
    flat = {"spearman_tau_H": 0.4, "tokens": 10, "tau_min": 2.7431, "tau_max": 2.7431001, "tau_mean": 2.7431}
    s = {"trained": flat, "init": {**flat, "spearman_tau_H": 0.0}}
    assert "tau hardly varies" in te.verdict(s) and "positively" in te.verdict(s)
    s["trained"] = {**flat, "spearman_tau_H": -0.3, "tau_min": 1.0, "tau_max": 3.0}
    assert "negatively" in te.verdict(s) and "hardly varies" not in te.verdict(s)


def test_adaptive_benchmark_table():
    ad = _load("adaptive_decoder")
    temps = [0.0, 1.0]

    def rows(det, var, tau_det, tau_var, choices=None):
        out = []
        for task, kind, r, t in (("copy", "deterministic", det, tau_det), ("count", "deterministic", det, tau_det),
                                 ("name", "varied", var, tau_var), ("rhyme", "varied", var, tau_var)):
            out.append({"task": task, "kind": kind, "reward": r, "temps": [t, t],
                        "choices": [] if choices is None else [temps.index(t)] * 2})
        return out

    results = {"fixed tau = 0": ad.summarize(rows(1.0, 0.0, 0.0, 0.0), 0, temps),
               "fixed tau = 1": ad.summarize(rows(0.2, 0.8, 1.0, 1.0), 0, temps),
               "adaptive (token, argmax)": ad.summarize(rows(0.9, 0.7, 0.0, 1.0, True), 2, temps)}
    assert results["adaptive (token, argmax)"]["reward"][0] == pytest.approx(0.8)
    assert results["adaptive (token, argmax)"]["choices_deterministic"] == {"0": 1.0, "1": 0.0}
    md = ad.table(results)
    assert "| adaptive (token, argmax) | **0.800 +- " in md and "| fixed tau = 1 | 0.500 +- " in md
    ch = ad.choices_table(results, temps)
    assert "| adaptive (token, argmax) | deterministic | 100% | 0% |" in ch
    assert "| adaptive (token, argmax) | varied | 0% | 100% |" in ch
