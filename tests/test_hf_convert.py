"""Hugging Face conversion: GPT and LLaMA with TempNet saved at TP=2 x PP=2 -> transformers folders whose
logits and per-token temperatures equal ours (LLaMA's TempNet with the scale input), and whose TempNet model
(trust_remote_code=True: generate and pipeline) samples the tokens, with the temperatures, of our generator
at the same seed; without remote code the folder is the plain architecture; half a TempNet is refused;
LLaMA HF -> ours -> HF is identical; a converted LLaMA starts a frozen-LM TempNet run; unsupported folders
are refused with the reason; export reads a TP=2 x PP=2 checkpoint without torch.distributed; GPT HF -> ours -> HF
is identical too."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import assert_same_hf_folders, spawn, tiny_config

TP2PP2 = dict(parallel__tensor_model_parallel_size=2, parallel__pipeline_model_parallel_size=2)
VOCAB = 300  # the tokenizer's; padded to 384
EOS, PAD = 2, 3  # train_sentencepiece's ids
PROMPTS = [[5, 17, 42, 9, 100, 7], [250, 3], [11, 12, 13, 14]]
NEW = 8
# our SamplingParams -> the same request to transformers' generate (the folder's generation_config.json
# gives the rest: do_sample, top_k 0, top_p 1, temperature 1)
SETTINGS = {
    "greedy": (dict(greedy=True), dict(do_sample=False)),
    "default": (dict(seed=7), dict()),
    "filtered": (dict(top_k=40, top_p=0.9, temperature=0.8, seed=3), dict(top_k=40, top_p=0.9, temperature=0.8)),
}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(cfgs):
    from megatron_tempnet.training.loop import train

    for cfg in cfgs:
        train(cfg)


def _convert_and_generate(root):
    """1 rank: export both checkpoints (LLaMA also in bf16), our logits / taus / generations (each prompt
    alone, and all as one batch), the LLaMA round trip, and a frozen-LM TempNet run started from the LLaMA
    converted back from Hugging Face."""
    from megatron_tempnet.hf.io import export_to_hf, import_from_hf
    from megatron_tempnet.inference.generation import MegatronBackend, SamplingParams, generate
    from megatron_tempnet.inference.model import forward, load_checkpoint_model
    from megatron_tempnet.training.loop import train

    out = {}
    for arch in ("gpt", "llama"):
        export_to_hf(os.path.join(root, arch), os.path.join(root, f"hf_{arch}"))
        model, _, _ = load_checkpoint_model(os.path.join(root, arch))
        logits, tau = forward(model, torch.tensor([PROMPTS[0]]))
        backend = MegatronBackend(model)
        out[arch] = {"logits": logits[0], "tau": tau[0]}
        for name, (ours, _) in SETTINGS.items():
            params = lambda: SamplingParams(max_new_tokens=NEW, stop_token_ids=[EOS], **ours)  # noqa: E731
            alone = [generate(backend, [p], params())[0] for p in PROMPTS]
            batch = generate(backend, PROMPTS, params())
            out[arch][name] = {"alone": [(g.token_ids, g.taus) for g in alone],
                               "batch": [(g.token_ids, g.taus) for g in batch]}
    export_to_hf(os.path.join(root, "llama"), os.path.join(root, "hf_llama_bf16"), dtype="bf16")
    import_from_hf(os.path.join(root, "hf_llama"), os.path.join(root, "ckpt_from_hf"))
    export_to_hf(os.path.join(root, "ckpt_from_hf"), os.path.join(root, "hf_llama_again"))
    import_from_hf(os.path.join(root, "hf_gpt"), os.path.join(root, "gpt_from_hf"))
    export_to_hf(os.path.join(root, "gpt_from_hf"), os.path.join(root, "hf_gpt_again"))
    frozen = tiny_config("llama", train__train_iters=1, train__mode="frozen_lm", model__vocab_size=VOCAB,
                         tempnet__hidden_size=8, checkpoint__pretrained_checkpoint=os.path.join(root, "ckpt_from_hf"),
                         checkpoint__save=os.path.join(root, "frozen"))
    out["frozen_losses"] = [h["loss"] for h in train(frozen).history if "loss" in h]
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from megatron_tempnet.data.tokenizer import train_sentencepiece
    from test_data_tokenizer import make_texts

    root = tmp_path_factory.mktemp("hf")
    tok = str(root / "tok")
    train_sentencepiece(make_texts(), tok, VOCAB, threads=1)
    # TempNet as the reference initialises it (tokens start at different temperatures) and one step at the
    # full learning rate (so LLaMA's scale input, which starts at 0, counts in the temperatures compared)
    cfgs = [tiny_config(arch, train__train_iters=1, train__lr_warmup_iters=0, model__vocab_size=VOCAB,
                        data__tokenizer_model=tok + ".model", checkpoint__save=str(root / arch),
                        tempnet__tau_init=None, tempnet__scale_input=arch == "llama", **TP2PP2)
            for arch in ("gpt", "llama")]
    spawn(_train, 4, cfgs)
    ours = spawn(_convert_and_generate, 1, str(root))[0]
    return root, ours


pytestmark = pytest.mark.slow
ARCH_CLASS = {"gpt": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def _remote(folder, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, **kwargs).eval()


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_converted_logits_and_temperatures_equal_ours(converted, arch):
    import transformers

    root, ours = converted
    folder = root / f"hf_{arch}"
    model = _remote(folder)
    assert type(model).__name__ == "TempNet" + ARCH_CLASS[arch]
    assert isinstance(model, getattr(transformers, ARCH_CLASS[arch]))
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == VOCAB
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[0]])).logits[0].float()
    assert logits.shape == ours[arch]["logits"].shape == (len(PROMPTS[0]), VOCAB)
    assert (logits - ours[arch]["logits"]).abs().max() < 1e-4
    assert (model.tempnet(logits) - ours[arch]["tau"]).abs().max() < 1e-4
    assert float(ours[arch]["tau"].std()) > 0  # TempNet gives each position its own temperature
    if arch == "llama":  # the scale input was trained, so it counts in the temperatures compared
        assert float(model.tempnet.scale_weight.abs().max()) > 0


def _assert_same(tokens, taus, want_tokens, want_taus):
    """One row of transformers' output (padded after its end) against our generator's lists."""
    n = len(want_tokens)
    assert tokens[:n] == want_tokens
    torch.testing.assert_close(taus[:n], torch.tensor(want_taus), atol=1e-4, rtol=0)
    assert bool(torch.isnan(taus[n:]).all()), "taus after the end-of-sequence token are NaN"


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_remote_code_generate_gives_our_tokens_and_temperatures(converted, arch, setting):
    """AutoModelForCausalLM(trust_remote_code=True).generate after torch.manual_seed(seed) = our generator
    with --seed seed: tokens and per-token temperatures, each prompt alone and as a left-padded batch."""
    root, ours = converted
    model = _remote(root / f"hf_{arch}")
    our_params, hf_kwargs = SETTINGS[setting]
    seed = our_params.get("seed", 0)
    for prompt, (tokens, taus) in zip(PROMPTS, ours[arch][setting]["alone"]):
        torch.manual_seed(seed)  # (the attention mask: PAD is one of the prompt's tokens)
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=NEW, return_dict_in_generate=True, **hf_kwargs)
        assert out.taus.shape == (1, out.sequences.shape[1] - len(prompt))
        _assert_same(out.sequences[0, len(prompt):].tolist(), out.taus[0], tokens, taus)
        assert model.last_tempnet_taus is out.taus
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    torch.manual_seed(seed)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, return_dict_in_generate=True, **hf_kwargs)
    for row, (tokens, taus) in enumerate(ours[arch][setting]["batch"]):
        _assert_same(out.sequences[row, width:].tolist(), out.taus[row], tokens, taus)


def test_our_generator_command_line_samples_what_the_fixture_compares(converted):
    """`python -m megatron_tempnet.generate --seed 3 ...` prints the tokens and temperatures that the tests
    above compare transformers' generate with."""
    root, ours = converted
    proc = subprocess.run([sys.executable, "-m", "megatron_tempnet.generate", "--load", str(root / "gpt"), "--prompt-ids",
                           " ".join(map(str, PROMPTS[0])), "--max-new-tokens", str(NEW), "--top-k", "40", "--top-p", "0.9",
                           "--temperature", "0.8", "--seed", "3", "--json"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    tokens, taus = ours["gpt"]["filtered"]["alone"][0]
    assert rec["token_ids"] == tokens
    torch.testing.assert_close(torch.tensor(rec["taus"]), torch.tensor(taus), atol=1e-5, rtol=0)


def _assert_same_folders(a, b):
    """Two Hugging Face folders with identical tensors (TempNet's among them), configs and copied files."""
    assert_same_hf_folders(a, b, lambda key: key.startswith("tempnet."))
    for name in ("modeling_tempnet.py", "configuration_tempnet.py", "tempnet_processor.py", "tokenizer.json",
                 "tokenizer.model"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_llama_round_trip_is_identical(converted):
    root, _ = converted
    _assert_same_folders(root / "hf_llama", root / "hf_llama_again")


def test_gpt_round_trip_is_identical(converted):
    root, _ = converted
    _assert_same_folders(root / "hf_gpt", root / "hf_gpt_again")


EXPORT_WITHOUT_PROCESS_GROUP = """
import sys, warnings
warnings.filterwarnings("ignore")
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

def refuse(*args, **kwargs):
    raise AssertionError("export started a process group or built a megatron model")

dist.init_process_group = refuse
GPTModel.__init__ = refuse
from megatron_tempnet.hf.io import export_to_hf

for ckpt, out in zip(sys.argv[1::2], sys.argv[2::2]):
    export_to_hf(ckpt, out)
    assert not dist.is_initialized() and not parallel_state.model_parallel_is_initialized()
print("exported without a process group")
"""


def test_export_of_a_tp2_pp2_checkpoint_needs_no_process_group(converted, tmp_path):
    """In a fresh process where starting a process group or building a megatron model fails, both TP=2 x PP=2
    checkpoints export to the folders the tests above check (identical tensors and configs)."""
    from megatron_tempnet.checkpoint import read_info, resolve_checkpoint

    root, _ = converted
    args = []
    for arch in ("gpt", "llama"):
        layout = read_info(resolve_checkpoint(root / arch))["layout"]
        assert (layout["tp"], layout["pp"]) == (2, 2)
        args += [str(root / arch), str(tmp_path / arch)]
    proc = subprocess.run([sys.executable, "-c", EXPORT_WITHOUT_PROCESS_GROUP, *args], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0 and "exported without a process group" in proc.stdout, proc.stderr[-3000:]
    for arch in ("gpt", "llama"):
        _assert_same_folders(root / f"hf_{arch}", tmp_path / arch)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_pipeline_samples_with_tempnet(converted, arch):
    """pipeline("text-generation", trust_remote_code=True) runs the TempNet model: the tokens and temperatures
    of its generate at the same seed, the temperatures readable afterwards."""
    from transformers import pipeline

    root, _ = converted
    folder = root / f"hf_{arch}"
    pipe = pipeline("text-generation", model=str(folder), trust_remote_code=True)
    assert type(pipe.model).__name__ == "TempNet" + ARCH_CLASS[arch]
    torch.manual_seed(11)
    text = pipe("def f(x):", max_new_tokens=NEW, return_full_text=False)[0]["generated_text"]
    taus = pipe.model.last_tempnet_taus
    assert isinstance(text, str) and taus is not None and taus.shape[0] == 1 and taus.shape[1] >= 1
    ids = pipe.tokenizer("def f(x):", return_tensors="pt")
    torch.manual_seed(11)
    out = pipe.model.generate(**ids, max_new_tokens=NEW, return_dict_in_generate=True)
    assert pipe.tokenizer.decode(out.sequences[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == text
    torch.testing.assert_close(out.taus, taus, equal_nan=True)
    lo, hi = 0.5, 5.0  # TempNet's default bounds
    finite = taus[torch.isfinite(taus)]
    assert bool(((finite >= lo) & (finite <= hi)).all())


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_without_remote_code_the_folder_is_the_plain_model_at_tau_1(converted, arch):
    from transformers import AutoModelForCausalLM

    root, _ = converted
    folder = root / f"hf_{arch}"
    plain = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert type(plain).__name__ == ARCH_CLASS[arch] and not hasattr(plain, "tempnet")
    model = _remote(folder)
    prompt = torch.tensor([PROMPTS[0]])
    runs = []
    for m, kwargs in ((plain, {}), (model, {"use_tempnet": False}), (model, {})):
        torch.manual_seed(5)
        runs.append(m.generate(prompt, max_new_tokens=NEW, **kwargs)[0].tolist())
    assert runs[0] == runs[1]  # plain = TempNet off
    assert model.last_tempnet_taus is not None


def test_generation_config_records_tempnet(converted):
    root, _ = converted
    lo, hi = 0.5, 5.0  # TempNet's default bounds
    for arch in ("gpt", "llama"):
        gen = json.loads((root / f"hf_{arch}" / "generation_config.json").read_text())
        assert gen["do_sample"] is True and gen["top_k"] == 0 and gen["top_p"] == 1.0 and gen["temperature"] == 1.0
        assert (gen["tempnet"]["tau_min"], gen["tempnet"]["tau_max"]) == (lo, hi)
        assert "trust_remote_code=True" in gen["tempnet"]["applied_by"]
        assert gen["eos_token_id"] == EOS and gen["pad_token_id"] == PAD
        cfg = json.loads((root / f"hf_{arch}" / "config.json").read_text())
        assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_tempnet.TempNet" + ARCH_CLASS[arch]
        assert cfg["model_type"] == ("gpt2" if arch == "gpt" else "llama") and cfg["tempnet"]["tau_min"] == lo
        assert cfg["tempnet"]["scale_input"] == (arch == "llama")


def test_bf16_export_keeps_tempnet_in_fp32(converted):
    from safetensors.torch import load_file

    root, _ = converted
    tensors = load_file(str(root / "hf_llama_bf16" / "model.safetensors"))
    assert {v.dtype for k, v in tensors.items() if k.startswith("tempnet.")} == {torch.float32}
    assert {v.dtype for k, v in tensors.items() if not k.startswith("tempnet.")} == {torch.bfloat16}
    model = _remote(root / "hf_llama_bf16", dtype="auto")
    assert model.tempnet.w1.dtype == torch.float32 and model.lm_head.weight.dtype == torch.bfloat16
    torch.manual_seed(0)
    out = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=4, return_dict_in_generate=True)
    assert out.taus.dtype == torch.float32 and bool(torch.isfinite(out.taus[0, :1]).all())


def _half_tempnet_folders(root, tmp_path):
    """Copies of the LLaMA folder: TempNet's config without its weights, its weights without its config, and
    TempNet in the files of an earlier converter."""
    from safetensors.torch import load_file, save_file

    folders = {}
    for case in ("config_only", "weights_only", "old_files"):
        folders[case] = tmp_path / case
        shutil.copytree(root / "hf_llama", folders[case])
    weights = folders["config_only"] / "model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if not k.startswith("tempnet.")}, str(weights),
              metadata={"format": "pt"})
    for case in ("weights_only", "old_files"):
        cfg = json.loads((folders[case] / "config.json").read_text())
        del cfg["tempnet"]
        (folders[case] / "config.json").write_text(json.dumps(cfg))
    weights = folders["old_files"] / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if not k.startswith("tempnet.")}, str(weights), metadata={"format": "pt"})
    save_file({k[len("tempnet."):]: v for k, v in tensors.items() if k.startswith("tempnet.")},
              str(folders["old_files"] / "tempnet.safetensors"))
    (folders["old_files"] / "tempnet_config.json").write_text("{}")
    return folders


HALF_MESSAGES = {"config_only": "config.json has a 'tempnet' entry but no .*safetensors holds TempNet's weights",
                 "weights_only": "holds TempNet's weights .* but config.json has no 'tempnet' entry",
                 "old_files": "holds TempNet as tempnet_config.json and tempnet.safetensors, which this version does not read"}


def test_half_a_tempnet_is_refused(converted, tmp_path):
    from megatron_tempnet.hf.convert import ConversionError
    from megatron_tempnet.hf.io import import_from_hf, load_hf_model
    from megatron_tempnet.hf.tempnet_processor import TempNetFolderError
    from megatron_tempnet.inference.generation import GenerationError

    root, _ = converted
    for case, folder in _half_tempnet_folders(root, tmp_path).items():
        message = HALF_MESSAGES[case]
        with pytest.raises(ValueError, match=message) as err:
            _remote(folder)
        assert type(err.value).__name__ == TempNetFolderError.__name__ and "\n" not in str(err.value)
        with pytest.raises(GenerationError, match=message):
            load_hf_model(folder)
        with pytest.raises(ConversionError, match=message):
            import_from_hf(str(folder), str(tmp_path / f"ours_{case}"))
        assert not (tmp_path / f"ours_{case}").exists()  # refused before any work
    # the generator's command line says it in one line, without a traceback
    proc = subprocess.run([sys.executable, "-m", "megatron_tempnet.generate", "--hf", str(tmp_path / "config_only"),
                           "--prompt-ids", "5 6 7", "--max-new-tokens", "2"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "no *.safetensors holds TempNet's weights" in lines[0], proc.stderr[-2000:]


def test_converted_llama_starts_a_frozen_lm_tempnet_run(converted):
    from megatron_tempnet.checkpoint import read_checkpoint_tensors

    root, ours = converted
    assert len(ours["frozen_losses"]) == 1
    before = read_checkpoint_tensors(root / "ckpt_from_hf" / "iter_0000000")
    after = read_checkpoint_tensors(root / "frozen" / "iter_0000001")
    lm = [k for k in before if not k.startswith(("tempnet.", "optimizer."))]
    assert lm and all(torch.equal(before[k], after[k]) for k in lm)  # the LM stayed frozen
    assert after["tempnet.w1"].shape == (8, 384)  # a fresh TempNet of the new size, trained


def test_tokenizer_folder_tokenizes_like_sentencepiece(converted):
    import glob
    import sysconfig

    from transformers import AutoTokenizer

    from megatron_tempnet.data.tokenizer import load_tokenizer

    root, _ = converted
    hf = AutoTokenizer.from_pretrained(str(root / "hf_gpt"))
    sp = load_tokenizer(str(root / "tok.model"))
    texts = ["def f(x):\n\treturn x  # two  spaces\n\n", "naïve café 日本 🙂 Ω\n", "  lead and trail  ", "", " "]
    for f in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:20]:
        texts.append(open(f, encoding="utf-8", errors="replace").read()[:2000])
    for t in texts:
        ids = sp.tokenize(t)
        assert hf.encode(t, add_special_tokens=False) == ids, t[:60]
        assert hf.decode(ids) == sp.detokenize(ids)


def test_unsupported_hf_folders_are_refused(tmp_path):
    from megatron_tempnet.hf.convert import ConversionError
    from megatron_tempnet.hf.io import read_hf_config

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(ConversionError, match="BertForMaskedLM .model_type 'bert'.; only .*LLaMA folders"):
        read_hf_config(str(bert))
    with pytest.raises(ConversionError, match="has no config.json"):
        read_hf_config(str(tmp_path))
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    (scaled / "config.json").write_text(json.dumps({
        "model_type": "llama", "num_attention_heads": 4, "hidden_size": 32, "attention_bias": True,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0}}))
    with pytest.raises(ConversionError, match="rope scaling 'linear'.*attention biases.*cannot be converted"):
        read_hf_config(str(scaled))
    # the CLI says the same, without a traceback
    proc = subprocess.run([sys.executable, "tools/convert_to_hf.py", "--from-hf", str(bert), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "LLaMA folders" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_converter_help_describes_every_flag():
    import importlib.util

    proc = subprocess.run([sys.executable, "tools/convert_to_hf.py", "--help"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and "Convert between our checkpoints" in proc.stdout
    assert "--dtype {fp32,bf16,fp16}" in proc.stdout and "trust_remote_code" in proc.stdout
    spec = importlib.util.spec_from_file_location("convert_to_hf", os.path.join(REPO, "tools", "convert_to_hf.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for action in tool.parser()._actions:
        if action.dest == "help":
            continue
        assert action.help, action.dest
        if not action.required and action.dest not in ("load", "from_hf"):  # (those two: one of them is required)
            assert "(default: " in action.help, action.dest
        if action.choices:
            assert f"{{{','.join(action.choices)}}}" in proc.stdout
