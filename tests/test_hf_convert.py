"""Hugging Face conversion: GPT and LLaMA with TempNet saved at TP=2 x PP=2 -> transformers folders whose
logits, greedy tokens and per-token temperatures equal ours; LLaMA HF -> ours -> HF is identical; a
converted LLaMA starts a frozen-LM TempNet run; unsupported folders are refused with the reason."""
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import spawn, tiny_config

TP2PP2 = dict(parallel__tensor_model_parallel_size=2, parallel__pipeline_model_parallel_size=2)
VOCAB = 300  # the tokenizer's; padded to 384
PROMPTS = [[5, 17, 42, 9, 100, 7], [250, 3], [11, 12, 13, 14]]
NEW = 6


def _train(cfgs):
    from megatron_tempnet.training.loop import train

    for cfg in cfgs:
        train(cfg)


def _convert_and_generate(root):
    """1 rank: export both checkpoints, our logits / taus / generations, the LLaMA round trip, and a
    frozen-LM TempNet run started from the LLaMA converted back from Hugging Face."""
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
        greedy = generate(backend, PROMPTS, SamplingParams(max_new_tokens=NEW, greedy=True))
        sampled = generate(backend, PROMPTS, SamplingParams(max_new_tokens=NEW, top_k=40, top_p=0.9, seed=3))
        out[arch] = {"logits": logits[0], "tau": tau[0], "greedy": [(g.token_ids, g.taus) for g in greedy],
                     "sampled": [g.token_ids for g in sampled]}
    import_from_hf(os.path.join(root, "hf_llama"), os.path.join(root, "ckpt_from_hf"))
    export_to_hf(os.path.join(root, "ckpt_from_hf"), os.path.join(root, "hf_llama_again"))
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
    cfgs = [tiny_config(arch, train__train_iters=1, model__vocab_size=VOCAB, data__tokenizer_model=tok + ".model",
                        checkpoint__save=str(root / arch), **TP2PP2) for arch in ("gpt", "llama")]
    spawn(_train, 4, cfgs)
    ours = spawn(_convert_and_generate, 1, str(root))[0]
    return root, ours


pytestmark = pytest.mark.slow
ARCH_CLASS = {"gpt": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def _hf(root, arch):
    from transformers import AutoModelForCausalLM

    from megatron_tempnet.hf.tempnet_processor import TempNetHead

    folder = root / f"hf_{arch}"
    return AutoModelForCausalLM.from_pretrained(str(folder)).eval(), TempNetHead.from_pretrained(folder), folder


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_converted_logits_and_temperatures_equal_ours(converted, arch):
    root, ours = converted
    model, head, folder = _hf(root, arch)
    assert type(model).__name__ == ARCH_CLASS[arch]
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == VOCAB
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[0]])).logits[0].float()
    assert logits.shape == ours[arch]["logits"].shape == (len(PROMPTS[0]), VOCAB)
    assert (logits - ours[arch]["logits"]).abs().max() < 1e-4
    assert (head(logits) - ours[arch]["tau"]).abs().max() < 1e-4
    assert float(ours[arch]["tau"].std()) > 0  # TempNet gives each position its own temperature


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_hf_generate_gives_our_tokens_and_temperatures(converted, arch):
    from transformers import LogitsProcessorList

    from megatron_tempnet.hf.tempnet_processor import TempNetLogitsProcessor
    from megatron_tempnet.inference.generation import HFBackend, SamplingParams, generate

    root, ours = converted
    model, head, _ = _hf(root, arch)
    for prompt, (tokens, taus) in zip(PROMPTS, ours[arch]["greedy"]):
        proc = TempNetLogitsProcessor(head, record=True)
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW,
                             logits_processor=LogitsProcessorList([proc]), pad_token_id=0, eos_token_id=None)
        assert out[0, len(prompt):].tolist() == tokens
        torch.testing.assert_close(torch.cat(proc.taus), torch.tensor(taus), atol=1e-4, rtol=0)
    # our sampling loop on the HF model (KV cache, left-padded batch) = on our model, greedy and sampled
    backend = HFBackend(model, head)
    greedy = generate(backend, PROMPTS, SamplingParams(max_new_tokens=NEW, greedy=True))
    assert [g.token_ids for g in greedy] == [t for t, _ in ours[arch]["greedy"]]
    sampled = generate(backend, PROMPTS, SamplingParams(max_new_tokens=NEW, top_k=40, top_p=0.9, seed=3))
    assert [g.token_ids for g in sampled] == ours[arch]["sampled"]


def test_llama_round_trip_is_identical(converted):
    from safetensors.torch import load_file

    root, _ = converted
    a, b = root / "hf_llama", root / "hf_llama_again"
    for name in ("model.safetensors", "tempnet.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert ca == cb
    for name in ("tempnet_config.json", "tokenizer.json", "tokenizer.model"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_converted_llama_starts_a_frozen_lm_tempnet_run(converted):
    from megatron_tempnet.training.checkpointing import read_checkpoint_tensors

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
    with pytest.raises(ConversionError, match="BertForMaskedLM .model_type 'bert'.; only LLaMA folders"):
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
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "only LLaMA" in proc.stderr
    assert "Traceback" not in proc.stderr
