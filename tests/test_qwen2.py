"""The Qwen2-style family (LLaMA plus QKV biases, tied or untied embeddings, its own rotary base): TP=2 x PP=2
training equals the single-rank run; a TP=2 x PP=2 checkpoint exports (without a process group) to a folder
that transformers loads as Qwen2ForCausalLM with our logits; HF -> ours -> HF is identical; a Qwen2 with TempNet
exports to the TempNet custom-code model with our temperatures; the example config loads."""
import json

import pytest
import torch

from helpers import assert_same_hf_folders, spawn, tiny_config
from test_parallel_equivalence import STEPS, _global_taus, _train_steps

pytestmark = pytest.mark.slow
ROTARY_BASE = 500000  # not the default 10000: the base must reach both our model and Hugging Face's
PROMPT = [[5, 17, 42, 9, 100, 7, 249, 0], [3, 1, 4, 1, 5, 9, 2, 6]]
TP2PP2 = dict(parallel__tensor_model_parallel_size=2, parallel__pipeline_model_parallel_size=2)


def qwen2_config(tied: bool, **overrides):
    return tiny_config("qwen2", model__num_query_groups=2, model__rotary_base=ROTARY_BASE,
                       model__untie_embeddings_and_output_weights=not tied, **overrides)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tp2_pp2_run_equals_single_rank(tied):
    ref = spawn(_train_steps, 1, qwen2_config(tied))[0]
    cfg = qwen2_config(tied, **TP2PP2)
    results = spawn(_train_steps, 4, cfg)
    for r in results:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), atol=1e-5, rtol=0)
    for step in range(STEPS):
        torch.testing.assert_close(_global_taus(results, step, cfg), ref["taus"][step], atol=1e-5, rtol=0)
    assert ref["losses"][-1] < ref["losses"][0]


def _train(cfgs):
    from megatron_tempnet.training.loop import train

    for cfg in cfgs:
        train(cfg)


def _our_logits(folders):
    """Our model's (logits [b, s, V], tau [b, s] or None) for PROMPT, per checkpoint folder (1 rank), and each HF
    round trip's checkpoint (import needs a process group) where an HF folder is given."""
    from megatron_tempnet.hf.io import import_from_hf
    from megatron_tempnet.inference.model import forward, load_checkpoint_model

    out = {}
    for ckpt, hf_dir, back in folders:
        model, _, _ = load_checkpoint_model(ckpt)
        out[ckpt] = forward(model, torch.tensor(PROMPT))
        if hf_dir:
            import_from_hf(hf_dir, back)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """TP=2 x PP=2 Qwen2 checkpoints (tied, untied; without TempNet) after two steps at the full learning rate
    (so the QKV biases, which start at zero, are trained), exported here in the test process, our logits, and
    each export converted back to our checkpoint and exported again."""
    from megatron_tempnet.hf.io import export_to_hf

    root = tmp_path_factory.mktemp("qwen2")
    cases = ("untied", "tied")
    cfgs = [qwen2_config(case == "tied", tempnet=False, train__train_iters=2, train__lr_warmup_iters=0,
                         checkpoint__save=str(root / case), **TP2PP2) for case in cases]
    cfgs.append(qwen2_config(False, train__train_iters=1, checkpoint__save=str(root / "tempnet")))
    spawn(_train, 4, cfgs[:2])
    spawn(_train, 1, cfgs[2:])
    import torch.distributed as dist

    started = dist.is_initialized()  # (another test of this process may have left a group)
    for case in cases:
        export_to_hf(str(root / case), str(root / f"hf_{case}"))
    assert dist.is_initialized() == started  # the export started no process group
    folders = [(str(root / c), str(root / f"hf_{c}"), str(root / f"back_{c}")) for c in cases]
    outputs = spawn(_our_logits, 1, folders + [(str(root / "tempnet"), None, None)])[0]
    for case in cases:
        export_to_hf(str(root / f"back_{case}"), str(root / f"hf_again_{case}"))
    return root, {case: outputs[str(root / case)][0] for case in (*cases, "tempnet")} | {
        "tempnet_tau": outputs[str(root / "tempnet")][1]}


@pytest.mark.parametrize("case", ["untied", "tied"])
def test_export_loads_as_qwen2_with_our_logits(exported, case):
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    root, ours = exported
    folder = root / f"hf_{case}"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["rope_parameters"]["rope_theta"] == ROTARY_BASE
    assert config["tie_word_embeddings"] == (case == "tied")
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert type(model) is Qwen2ForCausalLM
    assert float(model.model.layers[0].self_attn.q_proj.bias.detach().abs().max()) > 0  # trained biases are compared
    if case == "tied":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        logits = model(torch.tensor(PROMPT)).logits.float()
    assert logits.shape == ours[case].shape == (len(PROMPT), len(PROMPT[0]), 250)
    assert float((logits - ours[case]).abs().max()) < 1e-4


@pytest.mark.parametrize("case", ["untied", "tied"])
def test_hf_to_ours_to_hf_is_identical(exported, case):
    root, _ = exported
    assert_same_hf_folders(root / f"hf_{case}", root / f"hf_again_{case}", lambda key: key.endswith("q_proj.bias"))


def test_tempnet_on_qwen2_exports_with_our_temperatures(exported, tmp_path):
    """The TempNet custom code is made for the folder's model_type: a Qwen2 with TempNet loads (trust_remote_code)
    as TempNetQwen2ForCausalLM, a Qwen2ForCausalLM, with our logits and temperatures, and generates with them."""
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    from megatron_tempnet.hf.io import export_to_hf

    root, ours = exported
    export_to_hf(str(root / "tempnet"), str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_tempnet.TempNetQwen2ForCausalLM"
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    assert type(model).__name__ == "TempNetQwen2ForCausalLM" and isinstance(model, Qwen2ForCausalLM)
    with torch.no_grad():
        logits = model(torch.tensor(PROMPT)).logits.float()
        taus = model.tempnet(logits)
    assert float((logits - ours["tempnet"]).abs().max()) < 1e-4
    assert float((taus - ours["tempnet_tau"]).abs().max()) < 1e-4
    assert float(ours["tempnet_tau"].std()) > 0  # each position its own temperature
    out = model.generate(torch.tensor(PROMPT[:1]), attention_mask=torch.ones(1, len(PROMPT[0]), dtype=torch.long),
                         max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    new = out.sequences.shape[1] - len(PROMPT[0])
    assert new >= 1 and out.taus.shape == (1, new) and bool(torch.isfinite(out.taus[0, 0]))


def test_example_config_loads():
    from megatron_tempnet.config import load_config
    from megatron_tempnet.models.registry import model_dims

    cfg, _ = load_config(["--config", "examples/configs/tiny_qwen2.yaml"])
    dims = model_dims(cfg.model)
    assert cfg.model.arch == "qwen2" and cfg.model.rotary_base == 1000000 and dims.tied_embeddings
