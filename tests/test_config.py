"""Configuration: YAML + Megatron-style flags, and the early, clear refusal of impossible runs."""
import math
import re
import subprocess
import sys

import pytest

from megatron_tempnet.config import ConfigError, load_config
from megatron_tempnet.finalize import validate


def _validate(argv, world_size=4, cuda=False, te=False):
    cfg, _ = load_config(["--mock-data", "--vocab-size", "1000", *argv])
    validate(cfg, world_size, cuda_available=cuda, te_available=te)
    return cfg


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_layers: 6\n  hidden_size: 96\ntempnet:\n  enabled: true\n  lr: 0.5\n")
    cfg, _ = load_config(["--config", str(path), "--num-layers", "8", "--tempnet-lr", "2e-6", "--dro-rho", "4.5"])
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (8, 96)
    assert cfg.tempnet.enabled and cfg.tempnet.lr == 2e-6 and cfg.loss.dro_rho == 4.5


def test_example_configs_are_valid():
    for name in ("tiny_gpt", "tiny_llama"):
        cfg, _ = load_config(["--config", f"examples/configs/{name}.yaml"])
        validate(cfg, 4, cuda_available=False, te_available=False)


@pytest.mark.parametrize("yaml_text,expected", [
    ("model:\n  num_layer: 4\n", "did you mean 'model.num_layers'"),
    ("modle:\n  num_layers: 4\n", "did you mean 'model'"),
    ("model:\n  num_layers: four\n", "model.num_layers must be int"),
])
def test_unknown_or_mistyped_yaml_keys_are_refused(tmp_path, yaml_text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=expected):
        load_config(["--config", str(path)])


@pytest.mark.parametrize("argv,world,expected", [
    (["--num-attention-heads", "6", "--hidden-size", "96", "--tensor-model-parallel-size", "4"], 4,
     "num-attention-heads 6 is not divisible by --tensor-model-parallel-size 4"),
    (["--num-layers", "3", "--pipeline-model-parallel-size", "2"], 4, "num-layers 3 is not divisible by"),
    (["--num-layers", "4", "--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "4"], 4,
     "PP x virtual stages"),
    (["--global-batch-size", "6", "--micro-batch-size", "2"], 2, "global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2"),
    (["--tensor-model-parallel-size", "3"], 4, "world size 4 is not divisible by TP x PP"),
    (["--fp8-format", "hybrid"], 1, "needs a CUDA GPU"),
    (["--transformer-impl", "transformer_engine"], 1, "needs a CUDA GPU with Transformer Engine"),
    (["--sequence-parallel"], 1, "sequence-parallel needs Transformer Engine"),
    (["--mode", "frozen_lm"], 1, "enable it with --tempnet-enabled"),
    (["--mode", "finetune"], 1, "pass --pretrained-checkpoint"),
    (["--tempnet-enabled", "--tempnet-tau-min", "2", "--tempnet-tau-max", "1"], 1, "tau-min < --tempnet-tau-max"),
    (["--num-query-groups", "3"], 1, "must divide --num-attention-heads"),
    (["--precision", "bf16"], 1, "use --precision fp32"),
])
def test_impossible_combinations_are_refused(argv, world, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        _validate(argv, world)


def test_fp8_without_transformer_engine_on_gpu_is_refused():
    with pytest.raises(ConfigError, match="needs Transformer Engine"):
        _validate(["--fp8-format", "hybrid"], 1, cuda=True, te=False)
    _validate(["--fp8-format", "hybrid"], 1, cuda=True, te=True)  # accepted where it can run


def test_no_data_is_refused():
    cfg, _ = load_config([])
    with pytest.raises(ConfigError, match="--data-path"):
        validate(cfg, 1, cuda_available=False, te_available=False)


def test_cli_reports_config_error_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "megatron_tempnet.train", "--config", "examples/configs/tiny_gpt.yaml",
                           "--num-attention-heads", "3", "--dry-run"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "error: --hidden-size 64 is not divisible by --num-attention-heads 3" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_mock_data_needs_a_vocabulary_size():
    cfg, _ = load_config(["--mock-data"])
    with pytest.raises(ConfigError, match="--mock-data needs --vocab-size"):
        validate(cfg, 1, cuda_available=False, te_available=False)


@pytest.mark.parametrize("argv,expected", [
    ([], "TempNet with the DRO objective needs a target"),
    (["--dro-rho", repr(math.log(1000))], "target entropy log V - rho = 0 nats must lie strictly between 0"),
    (["--dro-target-entropy", "0"], "must lie strictly between 0 and log V"),
    (["--dro-target-entropy", "7.5"], "must lie strictly between 0 and log V = 6.908"),
    (["--dro-target-entropy", "2", "--dro-rho", "4"], "not both"),
    (["--dro-target-entropy", "2", "--tempnet-tau-init", "5"], "--tempnet-tau-init 5.0 must lie strictly between"),
    (["--dro-target-entropy", "2", "--tempnet-lr-schedule", "cosine"], "--tempnet-lr-schedule must be one of"),
])
def test_tempnet_without_a_reachable_target_is_refused(argv, expected):
    """rho = log V (the default) gives a target entropy of 0: every tau would be driven to tau_min."""
    with pytest.raises(ConfigError, match=re.escape(expected)):
        _validate(["--tempnet-enabled"] + argv, 1)


def test_a_reachable_target_is_accepted_and_sets_rho():
    from megatron_tempnet.config import dro_rho

    cfg = _validate(["--tempnet-enabled", "--dro-target-entropy", "2.5"], 1)
    assert dro_rho(cfg.loss, 1000) == pytest.approx(math.log(1000) - 2.5)
    base = _validate([], 1)  # no TempNet: rho = log V, plain cross-entropy
    assert dro_rho(base.loss, 1000) == pytest.approx(math.log(1000))
    _validate(["--tempnet-enabled", "--objective", "tau_ce"], 1)  # no DRO term


def test_node_local_caches_need_a_cache_folder_and_reach_the_dataset_builder(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="--data-cache-node-local needs --data-cache-path"):
        _validate(["--data-cache-node-local"], 1)
    cfg = _validate(["--data-cache-node-local", "--data-cache-path", str(tmp_path)], 1)
    from megatron_tempnet.data import datasets
    from megatron_tempnet.training import loop

    seen = {}
    monkeypatch.setattr(datasets, "require_train_and_valid", lambda split: None)
    monkeypatch.setattr(datasets, "build_gpt_datasets",
                        lambda *args, **kwargs: seen.update(kwargs, cache=args[6]) or (None, None, None))
    cfg.data.mock_data, cfg.data.data_path = False, ["prefix"]
    loop.build_datasets(cfg, tokenizer=object())
    assert seen["node_local_cache"] is True and seen["cache"] == str(tmp_path)
