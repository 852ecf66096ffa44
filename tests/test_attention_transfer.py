"""Attention transfer (models/attention_transfer.py, training/attention_transfer.py).

Copy mode: the student applies exactly the teacher's attention maps (and a student with the teacher's weights
is the teacher); its q/k projections get no gradient. Distill mode: the KL term and its gradient against the
formula, zero when the student is the teacher, falling in training. Bad teachers and flags are refused with
their fix. Parallel layouts (TP=2, PP=2, interleaved PP, LLaMA with grouped-query attention at TP=2) equal
the single-rank run in both modes. The benchmark script runs end to end at its test scale.
"""
import math
import re

import pytest
import torch

from helpers import spawn, tiny_config

STEPS = 3


# ----------------------------------------------------------------------------------------------------
# Teachers: tiny models trained for two steps from a wide initialisation (peaked attention maps)
# ----------------------------------------------------------------------------------------------------


def _teacher_config(arch, path):
    cfg = tiny_config(arch, tempnet=arch == "llama")  # a teacher saved with TempNet: its TempNet is not loaded
    cfg.model.init_method_std = 0.2
    cfg.train.train_iters = 2
    cfg.checkpoint.save = path
    return cfg


def _make_teacher(cfg):
    from megatron_tempnet.training.loop import train

    train(cfg)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """teachers(arch) -> path of a teacher checkpoint of tiny_config's shape (made once per arch)."""
    made = {}

    def get(arch):
        if arch not in made:
            path = str(tmp_path_factory.mktemp(f"teacher_{arch}"))
            spawn(_make_teacher, 1, _teacher_config(arch, path))
            made[arch] = path
        return made[arch]

    return get


def _student(arch, mode, teacher, tempnet=True, **overrides):
    cfg = tiny_config(arch, tempnet=tempnet, **overrides)
    cfg.attention_transfer.mode = mode
    cfg.attention_transfer.teacher_checkpoint = teacher
    return cfg


# ----------------------------------------------------------------------------------------------------
# The core attention and the distillation term
# ----------------------------------------------------------------------------------------------------


def _attention(heads, groups, **kw):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_tempnet.models.attention_transfer import ExplicitAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=heads, num_query_groups=groups,
                            use_cpu_initialization=True, masked_softmax_fusion=False, attention_dropout=0.0)
    return ExplicitAttention(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")


def _qkv(heads, groups, s=10, b=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(s, b, heads, d, generator=g), torch.randn(s, b, groups, d, generator=g),
            torch.randn(s, b, groups, d, generator=g))


def _reference_probs(q, k):
    """softmax(QK^T / sqrt(d)) with the causal mask, GQA groups repeated: [b, heads, s, s]."""
    q, k = q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3)
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    s = q.size(2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    return scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2)])
def test_explicit_attention_equals_sdpa_and_records_its_maps(single_rank, heads, groups):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_tempnet.models.attention import SDPAttention
    from megatron_tempnet.models.attention_transfer import TransferContext

    q, k, v = _qkv(heads, groups)
    mask = torch.triu(torch.ones(10, 10, dtype=torch.bool), 1)[None, None]
    attn = _attention(heads, groups)
    sdpa = SDPAttention(config=attn.config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    ref = sdpa(q, k, v, mask)
    torch.testing.assert_close(attn(q, k, v, mask), ref, rtol=1e-5, atol=1e-6)  # plain (no context)
    attn.context = TransferContext(role="teacher", num_layers=1, num_heads=heads)
    torch.testing.assert_close(attn(q, k, v, mask), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn.context.recorded[1], _reference_probs(q, k), rtol=1e-5, atol=1e-6)


def test_distill_term_value_and_gradient_match_the_formula(single_rank):
    from megatron_tempnet.models.attention_transfer import TransferContext

    heads, groups, layers, weight = 4, 2, 3, 0.7
    q, k, v = (t.requires_grad_() for t in _qkv(heads, groups))
    tq, tk, _ = _qkv(heads, groups, seed=1)
    teacher = _reference_probs(tq, tk)
    query_mask = torch.ones(3, 10)
    query_mask[1, 4:] = 0  # masked query tokens do not count
    attn = _attention(heads, groups)
    ctx = TransferContext(role="distill", num_layers=layers, num_heads=heads, distill_weight=weight,
                          supplied={1: teacher.clone()}, query_mask=query_mask, loss_scale=torch.tensor(2.0))
    attn.context = ctx
    grad_out = torch.randn(10, 3, heads * 8)
    out = attn(q, k, v, None)
    out.backward(grad_out)
    got = [t.grad.clone() for t in (q, k, v)]

    # The formula: out = P_s V; objective = <out, grad_out> + 2 (loss scale) * w / (L H) * sum mask * KL.
    for t in (q, k, v):
        t.grad = None
    p_s = _reference_probs(q, k)
    vv = v.permute(1, 2, 0, 3).repeat_interleave(heads // groups, dim=1)
    ref_out = (p_s @ vv).permute(2, 0, 1, 3).reshape(10, 3, -1)
    causal = torch.ones(10, 10, dtype=torch.bool).triu(1)
    kl_rows = torch.where(causal, 0.0, teacher * (teacher.clamp_min(1e-30).log() - p_s.clamp_min(1e-30).log())).sum(-1)
    kl = (kl_rows.sum(1) * query_mask).sum()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ctx.kl_sum.float(), kl.detach(), rtol=1e-5, atol=1e-6)
    ((ref_out * grad_out).sum() + 2.0 * weight / (layers * heads) * kl).backward()
    for g, t in zip(got, (q, k, v)):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-6)
    assert not ctx.supplied  # each layer takes its map

    # the student's own maps as the teacher's: KL zero
    ctx.kl_sum, ctx.supplied = None, {1: p_s.detach()}
    attn(q.detach(), k.detach(), v.detach(), None)
    assert abs(float(ctx.kl_sum)) < 1e-5


# ----------------------------------------------------------------------------------------------------
# Copy and distill in training (one rank)
# ----------------------------------------------------------------------------------------------------


def _copy_checks(cfg):
    from megatron_tempnet.training.attention_transfer import (
        _run_teacher, before_forward, load_teacher_weights, teacher_checkpoint, transfer_link)
    from megatron_tempnet.training.loop import build_datasets, data_iterators, setup_run
    from megatron_tempnet.models.build import build_model_chunks, unwrap
    from megatron_tempnet.training.step import train_step

    model, optimizer, scheduler = setup_run(cfg)
    link = transfer_link(model[0])
    ctx = link.student_contexts[0]
    batch = next(data_iterators(cfg, build_datasets(cfg)[0], 0, 1)[0])
    # 1. the student's maps are the teacher's, bit for bit, layer by layer
    ctx.record_applied = True
    before_forward(model[0], batch)
    model[0](batch.input_ids, batch.position_ids, batch.attention_mask)
    teacher_maps = _run_teacher(link, 0, batch)
    maps_equal = sorted(ctx.applied) == sorted(teacher_maps) == list(range(1, cfg.model.num_layers + 1)) and all(
        torch.equal(ctx.applied[n], teacher_maps[n]) for n in teacher_maps)
    maps_differ_by_layer = not torch.equal(teacher_maps[1], teacher_maps[2])
    ctx.record_applied = False
    # 2. q and k get no gradient, v does
    iters = data_iterators(cfg, build_datasets(cfg)[0], 0, 1)
    train_step(cfg, model, optimizer, scheduler, iters)
    qkv = unwrap(model[0]).decoder.layers[0].self_attention.linear_qkv.weight.main_grad
    qkv = qkv.view(cfg.model.num_attention_heads, 3, -1)  # GPT: one query head per group: [q, k, v] rows
    grads = {"q": float(qkv[:, 0].abs().max()), "k": float(qkv[:, 1].abs().max()), "v": float(qkv[:, 2].abs().max())}
    # 3. with the teacher's weights, the copy student is the teacher (a plain model with SDPA attention)
    ckpt = teacher_checkpoint(cfg)
    load_teacher_weights(ckpt, [unwrap(model[0])])
    before_forward(model[0], batch)
    student_logits, _ = model[0](batch.input_ids, batch.position_ids, batch.attention_mask)
    cfg.attention_transfer.mode = "none"
    plain = build_model_chunks(cfg)
    load_teacher_weights(ckpt, plain)
    plain_logits, _ = plain[0](batch.input_ids, batch.position_ids, batch.attention_mask)
    return {"maps_equal": maps_equal, "maps_differ_by_layer": maps_differ_by_layer, "grads": grads,
            "logits_diff": float((student_logits - plain_logits).abs().max())}


def test_copy_student_applies_the_teachers_maps_exactly(teachers):
    r = spawn(_copy_checks, 1, _student("gpt", "copy", teachers("gpt"), tempnet=False))[0]
    assert r["maps_equal"] and r["maps_differ_by_layer"]
    assert r["grads"]["q"] == 0.0 and r["grads"]["k"] == 0.0 and r["grads"]["v"] > 0.0
    assert r["logits_diff"] < 1e-4


def _distill_checks(cfg, steps):
    from megatron_tempnet.training.attention_transfer import load_teacher_weights, teacher_checkpoint
    from megatron_tempnet.training.loop import build_datasets, data_iterators, setup_run
    from megatron_tempnet.models.build import unwrap
    from megatron_tempnet.training.step import evaluate, train_step

    model, optimizer, scheduler = setup_run(cfg)
    train_ds, valid_ds = build_datasets(cfg)
    held_out_kl = lambda: evaluate(cfg, model, data_iterators(cfg, valid_ds, 0, 1), 1)["attn_kl"]  # noqa: E731
    before = held_out_kl()
    iters = data_iterators(cfg, train_ds, 0, 1)
    train_kls = [train_step(cfg, model, optimizer, scheduler, iters)["attn_kl"] for _ in range(steps)]
    after = held_out_kl()
    load_teacher_weights(teacher_checkpoint(cfg), [unwrap(model[0])])  # the student becomes the teacher
    return {"before": before, "train": train_kls, "after": after, "as_teacher": held_out_kl()}


def test_distill_kl_falls_and_is_zero_for_the_teacher(teachers):
    steps = 8
    cfg = _student("gpt", "distill", teachers("gpt"), tempnet=False, train__train_iters=steps,
                   train__lr_decay_style="constant", train__seed=7, model__init_method_std=0.2)
    cfg.attention_transfer.distill_weight = 10.0
    r = spawn(_distill_checks, 1, cfg, steps)[0]
    assert r["train"][0] == pytest.approx(r["before"], rel=0.5)  # same order (other samples)
    assert r["after"] < 0.6 * r["before"], r  # on the same held-out batch (0.70 -> 0.28 when written)
    assert abs(r["as_teacher"]) < 1e-6


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------


def test_missing_teacher_is_refused(tmp_path):
    from megatron_tempnet.config import ConfigError
    from megatron_tempnet.training.attention_transfer import teacher_config

    cfg = _student("gpt", "copy", str(tmp_path / "no_such_teacher"))
    with pytest.raises(ConfigError, match="no_such_teacher does not exist.*--attention-transfer-teacher-checkpoint"):
        teacher_config(cfg)
    (tmp_path / "empty").mkdir()
    cfg.attention_transfer.teacher_checkpoint = str(tmp_path / "empty")
    with pytest.raises(ConfigError, match="teacher checkpoint.*holds no checkpoint"):
        teacher_config(cfg)


@pytest.mark.parametrize("override,message", [
    (dict(model__num_layers=2), r"it has 4 layers, the student 2 \(--num-layers\)"),
    (dict(model__num_attention_heads=2), r"it has 4 attention heads, the student 2 \(--num-attention-heads\)"),
    (dict(model__vocab_size=300), r"vocabulary has 250 tokens, the student's 300: they must use the same tokenizer"),
    (dict(model__seq_length=32), r"position embeddings cover 16 tokens, fewer than --seq-length 32"),
])
def test_teacher_of_another_shape_is_refused(teachers, override, message):
    from megatron_tempnet.config import ConfigError
    from megatron_tempnet.training.attention_transfer import teacher_config

    with pytest.raises(ConfigError, match=message + r".*train the student with the teacher's layer and head counts"):
        teacher_config(_student("gpt", "distill", teachers("gpt"), **override))


def test_teacher_of_another_width_or_architecture_is_accepted(teachers):
    from megatron_tempnet.training.attention_transfer import teacher_config

    cfg = _student("llama", "copy", teachers("gpt"), model__hidden_size=64)  # same layers, heads and vocabulary
    tcfg = teacher_config(cfg)
    assert (tcfg.model.arch, tcfg.model.hidden_size, tcfg.tempnet.enabled) == ("gpt", 32, False)


def test_trainer_cli_refuses_a_bad_teacher_before_any_work(teachers, tmp_path, capsys):
    from megatron_tempnet.train import main

    tiny = ["--mock-data", "--vocab-size", "250", "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads",
            "4", "--seq-length", "16", "--attention-transfer-mode", "distill"]
    assert main([*tiny, "--attention-transfer-teacher-checkpoint", str(tmp_path / "missing")]) == 2
    assert "error: teacher checkpoint" in capsys.readouterr().err
    assert main([*tiny, "--num-layers", "2", "--attention-transfer-teacher-checkpoint", teachers("gpt")]) == 2
    err = capsys.readouterr().err
    assert "error: teacher checkpoint" in err and "it has 4 layers, the student 2 (--num-layers)" in err


@pytest.mark.parametrize("flags,message", [
    (["--attention-transfer-mode", "copy"], "needs a teacher: pass --attention-transfer-teacher-checkpoint"),
    (["--attention-transfer-mode", "clone"], "--attention-transfer-mode must be one of none, copy, distill"),
    (["--attention-transfer-mode", "distill", "--attention-transfer-teacher-checkpoint", "t",
      "--attention-transfer-distill-weight", "-1"], "--attention-transfer-distill-weight must be >= 0"),
    (["--attention-transfer-mode", "copy", "--attention-transfer-teacher-checkpoint", "t", "--mode", "frozen_lm",
      "--tempnet-enabled", "--dro-target-entropy", "3", "--pretrained-checkpoint", "p"], "cannot be combined with --mode frozen_lm"),
])
def test_bad_flags_are_refused(flags, message):
    from megatron_tempnet.config import ConfigError, load_config
    from megatron_tempnet.finalize import validate

    cfg, _ = load_config(["--mock-data", "--vocab-size", "250", *flags])
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg, 1, cuda_available=False, te_available=False)


# ----------------------------------------------------------------------------------------------------
# Parallel layouts equal the single-rank run (both modes, one process per layout)
# ----------------------------------------------------------------------------------------------------


def _train_both_modes(cfgs):
    from megatron_tempnet.training.loop import build_datasets, data_iterators, setup_run
    from megatron_tempnet.training.step import evaluate, train_step

    out = []
    for cfg in cfgs:
        model, optimizer, scheduler = setup_run(cfg)
        train_ds, valid_ds = build_datasets(cfg)
        iters = data_iterators(cfg, train_ds, 0, len(model))
        steps = [train_step(cfg, model, optimizer, scheduler, iters) for _ in range(STEPS)]
        ev = evaluate(cfg, model, data_iterators(cfg, valid_ds, 0, len(model)), 1)
        out.append({"loss": [m["loss"] for m in steps] + [ev["loss"]],
                    "attn_kl": [m.get("attn_kl") for m in steps] + [ev.get("attn_kl")]})
    return out


LAYOUTS = {  # (plain PP=2 runs the same teacher pipeline pass as the interleaved schedule, with one chunk)
    "tp2": dict(world=2, parallel__tensor_model_parallel_size=2),
    "pp2_vpp2": dict(world=2, parallel__pipeline_model_parallel_size=2, parallel__virtual_pipeline_model_parallel_size=2),
}
CASES = [("gpt", name) for name in LAYOUTS] + [("llama", "tp2")]  # LLaMA: grouped-query attention split by TP


@pytest.fixture(scope="module")
def single_rank_runs(teachers):
    cache = {}

    def get(arch):
        if arch not in cache:
            cfgs = [_student(arch, mode, teachers(arch)) for mode in ("copy", "distill")]
            cache[arch] = spawn(_train_both_modes, 1, cfgs)[0]
        return cache[arch]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("arch,layout", CASES)
def test_parallel_run_equals_single_rank(teachers, single_rank_runs, arch, layout):
    ref = single_rank_runs(arch)
    spec = dict(LAYOUTS[layout])
    world = spec.pop("world")
    cfgs = [_student(arch, mode, teachers(arch), **spec) for mode in ("copy", "distill")]
    for copy, distill in spawn(_train_both_modes, world, cfgs):  # every rank reports the same metrics
        torch.testing.assert_close(torch.tensor(copy["loss"]), torch.tensor(ref[0]["loss"]), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(distill["loss"]), torch.tensor(ref[1]["loss"]), atol=1e-5, rtol=0)
        assert all(kl > 0 for kl in ref[1]["attn_kl"])
        torch.testing.assert_close(torch.tensor(distill["attn_kl"]), torch.tensor(ref[1]["attn_kl"]), atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_benchmark_script_runs(tmp_path):
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    prefix = tmp_path / "out"
    proc = subprocess.run([sys.executable, os.path.join(repo, "benchmarks", "attention_transfer.py"), "--scale", "test",
                           "--mock-data", "--work-dir", str(tmp_path / "work"), "--output-prefix", str(prefix)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(f"{prefix}.jsonl")]
    assert [r["run"] for r in rows] == ["teacher", "scratch", "copy", "distill"]
    assert all(math.isfinite(r["heldout_ppl"]) for r in rows) and rows[3]["heldout_attn_kl"] > 0
    table = open(f"{prefix}.md").read()
    assert "student, attention copy" in table and "python benchmarks/attention_transfer.py --scale test" in table
    assert os.path.getsize(f"{prefix}.png") > 1000
