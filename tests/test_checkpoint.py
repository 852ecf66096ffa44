"""Training checkpoints: exact resume (TP=2 x PP=2 with TempNet; the distributed optimizer at DP=2),
loading at other layouts and optimizer kinds, and clear errors for checkpoints that cannot be used."""
import json
import os
import pickle

import pytest
import torch

from helpers import spawn, tiny_config

N = 4  # steps of the uninterrupted run; the interrupted one stops after N/2 and resumes
TP2PP2 = dict(parallel__tensor_model_parallel_size=2, parallel__pipeline_model_parallel_size=2)


def _runs(items):
    """Rank function: several runs in one process group, each building a fresh model. An item is a
    Config, or ("error", Config): then the run must fail and its message is returned."""
    from megatron_tempnet.checkpoint import CheckpointError
    from megatron_tempnet.training.loop import train

    out = []
    for item in items:
        if isinstance(item, tuple):
            try:
                train(item[1])
            except CheckpointError as err:
                out.append(str(err))
                continue
            raise AssertionError("the run was expected to fail")
        out.append([h["loss"] for h in train(item).history if "loss" in h])
    return out


def _cfg(arch, save, iters, **kw):
    return tiny_config(arch, train__train_iters=iters, train__lr_decay_iters=N, checkpoint__save=save,
                       checkpoint__save_interval=N // 2, **kw)


@pytest.fixture(scope="module")
def tp2pp2(tmp_path_factory):
    """Uninterrupted and interrupted + resumed runs at TP=2 x PP=2, GPT with TempNet, 4 ranks."""
    root = tmp_path_factory.mktemp("ckpt_tp2pp2")
    straight = _cfg("gpt", str(root / "straight"), N, **TP2PP2)
    first = _cfg("gpt", str(root / "split"), N // 2, **TP2PP2)
    resumed = _cfg("gpt", str(root / "split"), N, checkpoint__load=str(root / "split"), **TP2PP2)
    results = spawn(_runs, 4, [straight, first, resumed])
    for r in results[1:]:
        assert r == results[0]  # every rank reports the same losses
    return root, results[0]


@pytest.mark.slow
def test_resume_is_exact_tp2_pp2_with_tempnet(tp2pp2):
    from megatron_tempnet.checkpoint import TRACKER_FILE, read_checkpoint_tensors, read_info

    root, (straight, first, resumed) = tp2pp2
    assert len(straight) == N and len(first) == N // 2 and len(resumed) == N // 2
    assert first + resumed == straight  # bitwise equal losses
    assert (root / "split" / TRACKER_FILE).read_text().strip() == str(N)
    assert sorted(p.name for p in (root / "split").iterdir()) == ["iter_0000002", "iter_0000004", TRACKER_FILE]
    info = read_info(root / "split" / f"iter_{N:07d}")
    assert info["iteration"] == N and info["consumed_samples"] == N * 8
    assert info["layout"] == {"tp": 2, "pp": 2, "dp": 1, "world": 4, "vpp": None}
    a = read_checkpoint_tensors(root / "straight" / f"iter_{N:07d}")
    b = read_checkpoint_tensors(root / "split" / f"iter_{N:07d}")
    assert a.keys() == b.keys()
    assert any(k.startswith("tempnet.") for k in a) and any(k.startswith("optimizer.state.exp_avg.") for k in a)
    assert a["tempnet.w1"].shape == (16, 256)  # stored whole: W1 split by TP along the vocabulary
    for key in a:  # final weights and optimizer states identical
        assert torch.equal(a[key], b[key]), key


LOAD_LAYOUTS = {
    "tp1_pp1": (1, {}),
    # also a plain-optimizer checkpoint loaded into the distributed optimizer
    "tp1_pp2_distopt": (2, dict(parallel__pipeline_model_parallel_size=2, parallel__use_distributed_optimizer=True)),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LOAD_LAYOUTS))
def test_checkpoint_loads_at_another_layout(tp2pp2, layout):
    root, (straight, _, _) = tp2pp2
    world, kw = LOAD_LAYOUTS[layout]
    ckpt = str(root / "split" / f"iter_{N // 2:07d}")
    runs = [tiny_config("gpt", train__train_iters=N, train__lr_decay_iters=N, checkpoint__load=ckpt, **kw)]
    if world == 1:  # the same checkpoint refused by a model of another shape, with the flag to fix
        runs.append(("error", tiny_config("gpt", train__train_iters=N, model__hidden_size=64, checkpoint__load=ckpt)))
    results = spawn(_runs, world, runs)
    torch.testing.assert_close(torch.tensor(results[0][0]), torch.tensor(straight[N // 2:]), atol=1e-5, rtol=0)
    if world == 1:
        msg = results[0][1]
        assert "--hidden-size: checkpoint 32, this run 64" in msg and "model flags" in msg


@pytest.mark.slow
def test_distributed_optimizer_resume_is_exact(tmp_path):
    """LLaMA with TempNet, distributed optimizer at DP=2; then its checkpoint loads at DP=1, plain Adam."""
    kw = dict(parallel__use_distributed_optimizer=True)
    straight = _cfg("llama", str(tmp_path / "straight"), N, **kw)
    first = _cfg("llama", str(tmp_path / "split"), N // 2, **kw)
    resumed = _cfg("llama", str(tmp_path / "split"), N, checkpoint__load=str(tmp_path / "split"), **kw)
    s, f, r = spawn(_runs, 2, [straight, first, resumed])[0]
    assert f + r == s
    plain = tiny_config("llama", train__train_iters=N, train__lr_decay_iters=N,
                        checkpoint__load=str(tmp_path / "split" / f"iter_{N // 2:07d}"))
    (other,) = spawn(_runs, 1, [plain])[0]
    torch.testing.assert_close(torch.tensor(other), torch.tensor(s[N // 2:]), atol=1e-5, rtol=0)


def test_bf16_with_fp32_tempnet_resume_is_exact(tmp_path):
    """16-bit LM weights next to TempNet's fp32 ones (the GPU setting, run here in bf16 on a CPU): the run takes
    the distributed optimizer by itself, since megatron-core's plain bf16 optimizer cannot checkpoint the mix,
    and resumes bit for bit."""
    kw = dict(train__precision="bf16")
    straight = _cfg("gpt", str(tmp_path / "straight"), N, **kw)
    first = _cfg("gpt", str(tmp_path / "split"), N // 2, **kw)
    resumed = _cfg("gpt", str(tmp_path / "split"), N, checkpoint__load=str(tmp_path / "split"), **kw)
    s, f, r = spawn(_runs, 1, [straight, first, resumed])[0]
    assert f + r == s
    from megatron_tempnet.checkpoint import read_info

    assert read_info(tmp_path / "split" / f"iter_{N:07d}")["config"]["parallel"]["use_distributed_optimizer"]


# ------------------------------------------------------------------------------------------------------
# Bad input: clear errors, no process group needed
# ------------------------------------------------------------------------------------------------------


def _fake_checkpoint(d, iteration=2, **config_overrides):
    from megatron_tempnet.checkpoint import FORMAT, FORMAT_VERSION, INFO_FILE

    d.mkdir(parents=True)
    (d / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    cfg = tiny_config("gpt", **config_overrides)
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "iteration": iteration, "consumed_samples": 16,
            "contents": ["model", "optimizer", "scheduler", "rng"], "config": cfg.to_dict(),
            "layout": {"tp": 1, "pp": 1, "dp": 1, "world": 1, "vpp": None}}
    (d / INFO_FILE).write_text(json.dumps(info))
    return d


def test_missing_and_partial_checkpoints_are_named(tmp_path):
    from megatron_tempnet.checkpoint import CheckpointError, TRACKER_FILE, resolve_checkpoint

    with pytest.raises(CheckpointError, match="does not exist; check the path"):
        resolve_checkpoint(tmp_path / "nowhere")
    assert resolve_checkpoint(tmp_path / "nowhere", allow_empty=True) is None  # --load == --save, first run
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        resolve_checkpoint(tmp_path / "empty")

    save = tmp_path / "save"
    _fake_checkpoint(save / "iter_0000002")
    partial = save / ".tmp_iter_0000004"  # an interrupted save: DCP files, no tempnet_checkpoint.json
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no latest_checkpointed_iteration.txt.*iter_0000002"):
        resolve_checkpoint(save)
    (save / TRACKER_FILE).write_text("2\n")
    assert resolve_checkpoint(save) == save / "iter_0000002"
    with pytest.raises(CheckpointError, match="incomplete.*interrupted"):
        resolve_checkpoint(partial)
    (save / TRACKER_FILE).write_text("4\n")  # tracker naming a checkpoint that is not there
    with pytest.raises(CheckpointError, match="names iteration 4 but .* missing or incomplete.*iter_0000002"):
        resolve_checkpoint(save)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "metadata.json").write_text("{}")
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_checkpoint(tmp_path / "junk")


def test_other_model_shape_and_impossible_layout_are_refused(tmp_path):
    from megatron_tempnet.checkpoint import CheckpointError, check_layout_fits, check_model_matches, read_info

    ckpt = _fake_checkpoint(tmp_path / "iter_0000002")
    saved = read_info(ckpt)["config"]
    with pytest.raises(CheckpointError,
                       match=r"another model shape \(--num-layers: checkpoint 4, this run 6\); run with the checkpoint"):
        check_model_matches(saved, tiny_config("gpt", model__num_layers=6), str(ckpt), tempnet_optional=False)
    with pytest.raises(CheckpointError, match=r"--arch: checkpoint gpt, this run llama"):
        check_model_matches(saved, tiny_config("llama"), str(ckpt), tempnet_optional=False)
    with pytest.raises(CheckpointError, match="--tempnet-enabled"):
        check_model_matches(saved, tiny_config("gpt", tempnet=False), str(ckpt), tempnet_optional=False)
    check_model_matches(saved, tiny_config("gpt", tempnet=False), str(ckpt), tempnet_optional=True)  # weights only
    with pytest.raises(CheckpointError, match=r"--untie-embeddings-and-output-weights: checkpoint True, this run False"):
        check_model_matches(saved, tiny_config("gpt", model__untie_embeddings_and_output_weights=True), str(ckpt),
                            tempnet_optional=False)
    with pytest.raises(CheckpointError, match=r"TP=8 x PP=3: its 4 attention heads do not split over TP=8.*"
                                              r"its 4 layers do not split over 3 pipeline stages.*TP in \[1, 2, 4\]"):
        check_layout_fits(saved["model"], 8, 3)
    check_layout_fits(saved["model"], 2, 2)


def test_metadata_that_would_run_code_is_refused(tmp_path):
    """DCP's .metadata is a pickle: ours is read with an unpickler that builds only metadata classes."""
    from megatron_tempnet.checkpoint import CheckpointError, checkpoint_tensor_shapes

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    ckpt = _fake_checkpoint(tmp_path / "iter_0000002")
    (ckpt / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises((pickle.UnpicklingError, CheckpointError), match="posix.system|refusing"):
        checkpoint_tensor_shapes(ckpt)
    assert not (tmp_path / "pwned").exists()


def test_model_only_checkpoint_cannot_be_resumed(tmp_path):
    from megatron_tempnet.checkpoint import CheckpointError, INFO_FILE, load_checkpoint

    ckpt = _fake_checkpoint(tmp_path / "iter_0000000", iteration=0)
    info = json.loads((ckpt / INFO_FILE).read_text())
    info["contents"] = ["model"]
    (ckpt / INFO_FILE).write_text(json.dumps(info))
    cfg = tiny_config("gpt", checkpoint__load=str(ckpt))
    with pytest.raises(CheckpointError, match="model weights only.*--pretrained-checkpoint"):
        load_checkpoint(cfg, [], None, None)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    from megatron_tempnet.checkpoint import prune_checkpoints as _prune

    for it in (1, 2, 3, 4, 5):
        _fake_checkpoint(tmp_path / f"iter_{it:07d}", iteration=it)
    (tmp_path / ".tmp_iter_0000006").mkdir()  # an interrupted save
    (tmp_path / ".old_iter_0000003").mkdir()  # a replaced one not yet removed
    _prune(tmp_path, 2, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000004", "iter_0000005"]
    _prune(tmp_path, 0, 5)  # 0 keeps all
    assert len(list(tmp_path.iterdir())) == 2
