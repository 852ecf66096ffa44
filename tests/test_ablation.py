"""benchmarks/tempnet_ablation.py: the arms differ only where they should, ECE on constructed examples, the
held-out windows, the evaluation against the model's own loss path, and the verdict rule."""
import math
import os
import sys

import pytest
import torch

from helpers import spawn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import tempnet_ablation as ta  # noqa: E402

MOCK = {"mock": True, "vocab_size": 250}  # padded to 256: the padded entries are exercised


def settings(*argv, vocab_size=250):
    return ta.resolve_settings(ta.build_parser().parse_args(["--scale", "test", *argv]), vocab_size)


# -- calibration --------------------------------------------------------------------------------------------

def test_ece_constructed_example():
    # 4 predictions at 0.95 (3 right), 4 at 0.55 (2 right), 2 at 0.25 (none right):
    # ECE = 0.4 |0.95 - 0.75| + 0.4 |0.55 - 0.5| + 0.2 |0.25 - 0| = 0.08 + 0.02 + 0.05
    conf = torch.tensor([0.95] * 4 + [0.55] * 4 + [0.25] * 2)
    correct = torch.tensor([1, 1, 1, 0, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    assert ta.expected_calibration_error(conf, correct) == pytest.approx(0.15, abs=1e-12)
    # accumulated over batches = one pass
    bins = ta.CalibrationBins()
    bins.add(conf[:3], correct[:3])
    bins.add(conf[3:], correct[3:])
    assert bins.ece() == pytest.approx(0.15, abs=1e-12)
    # 15 equal-width bins (lo, hi]: 0.05 in the first, 0.5 in the eighth, 1.0 in the last; calibrated gives 0
    assert ta.expected_calibration_error(torch.tensor([1.0, 1.0]), torch.tensor([True, True])) == 0.0
    b = ta.CalibrationBins()
    b.add(torch.tensor([0.05, 0.5, 1.0]), torch.tensor([0, 0, 1]))
    assert b.count.tolist() == [1] + [0] * 6 + [1] + [0] * 6 + [1]
    # within one bin, over- and under-confidence cancel (ECE compares the bin's means)
    assert ta.expected_calibration_error(torch.tensor([0.61, 0.65]), torch.tensor([1, 0])) == pytest.approx(0.13)


def test_top1_confidence_with_temperature():
    # probabilities 0.6, 0.2, 0.1, 0.1 at tau = 1; at tau = 0.5 they go as 36 : 4 : 1 : 1
    z = torch.log(torch.tensor([[6.0, 2.0, 1.0, 1.0], [1.0, 1.0, 2.0, 6.0]]))
    conf, pred = ta.top1_confidence(z)
    torch.testing.assert_close(conf, torch.tensor([0.6, 0.6]))
    assert pred.tolist() == [0, 3]
    conf_t, pred_t = ta.top1_confidence(z, torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(conf_t, torch.tensor([36 / 42, math.sqrt(6) / (math.sqrt(6) + math.sqrt(2) + 2)]))
    assert pred_t.tolist() == [0, 3]  # a temperature never changes the prediction
    _, _, ce = ta.prediction_stats(z, torch.tensor([0.5, 2.0]), torch.tensor([1, 3]))
    torch.testing.assert_close(ce, torch.tensor([-math.log(4 / 42), -math.log(math.sqrt(6) / (math.sqrt(6) + math.sqrt(2) + 2))]))


# -- the arms -----------------------------------------------------------------------------------------------

def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def test_arms_differ_only_in_their_switches():
    s = settings()
    data = {"train": ["/d/train_00000"], "heldout": ["/d/heldout_00000"], "tokenizer": "/d/tok.model"}
    base = _flat(ta.arm_config("baseline", 7, s, data).to_dict())
    assert not base["tempnet.enabled"] and base["loss.dro_rho"] is None  # plain cross-entropy
    expected = {
        "dro_global": {"tempnet.enabled": True, "tempnet.kind": "global", "loss.dro_rho": s["rho"]},
        "tempnet_tau_ce": {"tempnet.enabled": True, "loss.objective": "tau_ce"},
        "tempnet_dro": {"tempnet.enabled": True, "loss.dro_rho": s["rho"]},
    }
    for arm, diff in expected.items():
        cfg = _flat(ta.arm_config(arm, 7, s, data).to_dict())
        assert {k: v for k, v in cfg.items() if v != base[k]} == diff, arm
    # a seed changes only the seed
    other = _flat(ta.arm_config("baseline", 8, s, data).to_dict())
    assert {k for k in other if other[k] != base[k]} == {"train.seed"}


def test_reference_defaults():
    s = settings(vocab_size=4096)
    # the reference's target entropy log V - rho (GPT-2: V = 50304, rho = 8.0) at our vocabulary
    assert math.log(4096) - s["rho"] == pytest.approx(math.log(50304) - 8.0)
    assert s["tempnet_lr"] * s["train_iters"] == pytest.approx(2e-6 * 50000)
    assert (s["tau_min"], s["tau_max"]) == (0.5, 5.0)
    llama = settings("--arch", "llama", vocab_size=4096)
    assert (llama["tau_min"], llama["tau_max"], llama["tempnet_input_variant"]) == (0.01, 2.0, "max_shifted")
    given = settings("--rho", "3.5", "--tempnet-lr", "1e-4")
    assert (given["rho"], given["tempnet_lr"]) == (3.5, 1e-4)


def _run(spec):
    return ta.train_arm(spec)


def test_dro_without_temperature_equals_baseline_bit_for_bit():
    """The DRO arm's configuration with TempNet disabled and rho = log V trains exactly like the baseline: same
    losses and same final weights, bit for bit; the real TempNet + DRO arm does not (the check can fail)."""
    s = settings()
    common = {"seed": 3, "settings": s, "data": MOCK, "keep_params": True}
    base = spawn(_run, 1, {**common, "arm": "baseline"})[0]
    dro = spawn(_run, 1, {**common, "arm": "tempnet_dro",
                          "overrides": {"tempnet.enabled": False, "loss.dro_rho": math.log(MOCK["vocab_size"])}})[0]
    assert len(base["losses"]) == s["train_iters"]
    assert torch.equal(torch.tensor(base["losses"], dtype=torch.float64), torch.tensor(dro["losses"], dtype=torch.float64))
    assert base["params"].keys() == dro["params"].keys()
    for name, value in base["params"].items():
        assert torch.equal(value, dro["params"][name]), name
    assert base["ppl_tau1"] == dro["ppl_tau1"] and base["ece_tau1"] == dro["ece_tau1"]
    real = spawn(_run, 1, {**common, "arm": "tempnet_dro", "keep_params": False})[0]
    assert real["losses"][0] != base["losses"][0]


def _eval_against_loss_path(s):
    """heldout_metrics (logits without labels, padded vocabulary sliced off) against the model's own labelled
    forward (LMOutput: CE at tau = 1 and CE(z / tau), padded vocabulary masked inside the loss)."""
    from megatron_tempnet import runtime
    from megatron_tempnet.models.build import causal_mask
    from megatron_tempnet.training.loop import setup_run

    cfg = ta.arm_config("tempnet_tau_ce", 5, s, MOCK)
    model, _, _ = setup_run(cfg)
    chunk = model[0]
    with torch.no_grad():  # spread the temperatures, from the middle of the range, so that tau matters per token
        chunk.module.tempnet.last.weight.normal_(0, 30.0)
        chunk.module.tempnet.last.bias.zero_()
    windows = ta.heldout_windows(MOCK, cfg.model.seq_length, cfg.model.vocab_size)
    got = ta.heldout_metrics(chunk, windows, cfg.model.vocab_size, micro_batch_size=8)
    s_len = windows.size(1) - 1
    chunk.eval()
    ce1, ce_tau, taus = [], [], []
    with torch.no_grad(), runtime.native_torch():
        for i in range(0, windows.size(0), 8):
            w = windows[i:i + 8]
            pos = torch.arange(s_len).unsqueeze(0).expand(w.size(0), s_len)
            out = chunk(w[:, :-1], pos, causal_mask(s_len, torch.device("cpu")), labels=w[:, 1:])
            ce1.append(out.ce_at_tau1.reshape(-1))
            ce_tau.append(out.ce_tau.reshape(-1))
            taus.append(out.tau.reshape(-1))
        logits, _ = chunk(windows[:2, :-1], pos[:2], causal_mask(s_len, torch.device("cpu")))
    tau = torch.cat(taus).double()
    return {"got": got, "ppl_tau1": math.exp(torch.cat(ce1).double().mean()),
            "ppl_tau": math.exp(torch.cat(ce_tau).double().mean()), "tau_mean": float(tau.mean()),
            "tau_std": float(tau.std(unbiased=False)), "tokens": tau.numel(), "padded_width": logits.size(-1)}


def test_heldout_metrics_match_the_models_loss_path():
    r = spawn(_eval_against_loss_path, 1, settings())[0]
    got = r["got"]
    assert r["padded_width"] == 256 and got["tokens"] == r["tokens"]  # the logits carried padding; it was dropped
    assert got["ppl_tau1"] == pytest.approx(r["ppl_tau1"], rel=1e-5)
    assert got["ppl_tau"] == pytest.approx(r["ppl_tau"], rel=1e-5)
    assert got["ppl_tau"] != pytest.approx(got["ppl_tau1"], rel=1e-3)
    assert got["tau_mean"] == pytest.approx(r["tau_mean"], rel=1e-6)
    assert got["tau_std"] == pytest.approx(r["tau_std"], rel=1e-4) and r["tau_std"] > 0.01
    assert 0 <= got["ece_tau1"] <= 1 and 0 <= got["ece_tau"] <= 1


# -- held-out windows and the verdict ------------------------------------------------------------------------

def test_heldout_windows_are_consecutive_and_cover_every_document(tmp_path):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "heldout")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    docs = [np.arange(1, 40), np.arange(100, 123), np.arange(200, 260)]
    for d in docs:
        builder.add_document(torch.tensor(d, dtype=torch.int64), [len(d)])
    builder.finalize(prefix + ".idx")
    w = ta.heldout_windows({"heldout": [prefix]}, 10, 300)
    stream = np.concatenate(docs)
    assert w.shape == ((len(stream) - 1) // 10, 11)
    assert torch.equal(torch.cat([w[:, :-1].reshape(-1), w[-1:, -1]]), torch.from_numpy(stream[: w.size(0) * 10 + 1]))
    sub = ta.spread_subset(w, 4)
    assert sub.size(0) == 4 and torch.equal(sub[0], w[0]) and torch.equal(ta.spread_subset(w, 0), w)


def test_verdict_rule():
    base = [10.0, 10.1, 9.9]  # sd 0.1
    assert ta.compare(base, [9.5, 9.6, 9.4])["verdict"] == "better"
    assert ta.compare(base, [10.5, 10.6, 10.4])["verdict"] == "worse"
    assert ta.compare(base, [9.9, 10.0, 9.8])["verdict"] == "within 2 sd"
    c = ta.compare(base, [9.5, 9.6, 9.4])
    assert c["diff"] == pytest.approx(-0.5) and c["pooled_sd"] == pytest.approx(0.1) and c["sds"] == pytest.approx(-5)
    assert c["paired_mean"] == pytest.approx(-0.5) and c["paired_sd"] == pytest.approx(0.0, abs=1e-12)
    assert ta.compare([0.5, 0.6, 0.7], [0.9, 1.0, 1.1], lower_is_better=False)["verdict"] == "better"
