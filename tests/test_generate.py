"""Generation with TempNet's per-token temperatures: the sampling rules, the loop (stop tokens, limits,
errors), and the CLI on one of our checkpoints and on its Hugging Face conversion (same tokens, same taus)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_tempnet.inference.generation import (GenerationError, SamplingParams, choose, generate,
                                                   warp_logits)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_logits_are_divided_by_tau_then_filtered():
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0]])
    tau = torch.tensor([0.5, 2.0])
    out = warp_logits(z, tau, SamplingParams())
    torch.testing.assert_close(out, z / tau[:, None])
    torch.testing.assert_close(warp_logits(z, tau, SamplingParams(use_tempnet=False, temperature=2.0)), z / 2)
    top2 = warp_logits(z, None, SamplingParams(top_k=2))
    assert torch.isfinite(top2).sum(-1).tolist() == [2, 2] and torch.isfinite(top2[0, :2]).all()
    # top-p: the smallest set of most likely tokens whose mass reaches p (the top token always stays)
    p = torch.softmax(z[0], -1)  # 0.644, 0.237, 0.087, 0.032
    nucleus = warp_logits(z[:1], None, SamplingParams(top_p=0.85))
    assert torch.isfinite(nucleus[0]).tolist() == [True, True, False, False], p
    assert torch.isfinite(warp_logits(z[:1], None, SamplingParams(top_p=0.01))[0]).sum() == 1
    g = torch.Generator().manual_seed(0)
    assert choose(z, SamplingParams(greedy=True), g).tolist() == [0, 2]


class _Fixed:
    """A backend whose next-token logits favour (last token + 1) mod V; tau = 1 + position / 10."""

    vocab_size, max_length, has_tempnet = 10, 12, True

    def prefill(self, seqs):
        self.seqs = [list(s) for s in seqs]
        return self._out()

    def step(self, tokens):
        for s, t in zip(self.seqs, tokens):
            s.append(t)
        return self._out()

    def _out(self):
        logits = torch.full((len(self.seqs), 10), -5.0)
        for i, s in enumerate(self.seqs):
            logits[i, (s[-1] + 1) % 10] = 5.0
        return logits, torch.tensor([1 + len(s) / 10 for s in self.seqs])


def test_generation_loop_stops_and_reports_each_tau():
    out = generate(_Fixed(), [[1, 2], [6]], SamplingParams(max_new_tokens=5, greedy=True, stop_token_ids=[8]))
    assert out[0].token_ids == [3, 4, 5, 6, 7] and out[0].finish_reason == "length"
    assert out[1].token_ids == [7, 8] and out[1].finish_reason == "stop"
    assert out[0].taus == pytest.approx([1.2, 1.3, 1.4, 1.5, 1.6])
    a = generate(_Fixed(), [[1]], SamplingParams(max_new_tokens=4, seed=5))
    b = generate(_Fixed(), [[1]], SamplingParams(max_new_tokens=4, seed=5))
    assert a[0].token_ids == b[0].token_ids  # seeded
    with pytest.raises(GenerationError, match="exceeds the model's 12 positions"):
        generate(_Fixed(), [[1] * 10], SamplingParams(max_new_tokens=5))
    with pytest.raises(GenerationError, match=r"token ids \[10\] outside the vocabulary"):
        generate(_Fixed(), [[10]], SamplingParams())
    with pytest.raises(GenerationError, match="has no tokens"):
        generate(_Fixed(), [[]], SamplingParams())
    with pytest.raises(GenerationError, match="--top-p"):
        generate(_Fixed(), [[1]], SamplingParams(top_p=0))


def _run(args, timeout=600):
    from helpers import free_port

    env = dict(os.environ, MASTER_PORT=str(free_port()))  # never the default port other runs may hold
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LLaMA with TempNet and a sentencepiece tokenizer, trained 2 steps by the CLI."""
    from megatron_tempnet.data.tokenizer import train_sentencepiece
    from test_data_tokenizer import make_texts

    root = tmp_path_factory.mktemp("gen")
    train_sentencepiece(make_texts(), str(root / "tok"), 300, threads=1)
    proc = _run(["-m", "megatron_tempnet.train", "--config", "examples/configs/tiny_llama.yaml", "--vocab-size", "300",
                 "--tokenizer-model", str(root / "tok.model"), "--num-layers", "2", "--hidden-size", "32",
                 "--seq-length", "32", "--train-iters", "2", "--eval-interval", "0", "--eval-iters", "1",
                 "--tempnet-hidden-size", "16", "--save", str(root / "ckpt")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.slow
def test_generate_cli_on_checkpoint_and_converted_folder(trained):
    root = trained
    common = ["--prompt", "def f(x):", "--prompt", "return self", "--max-new-tokens", "5", "--json", "--ignore-eos"]
    ours = _run(["-m", "megatron_tempnet.generate", "--load", str(root / "ckpt"), "--greedy", *common])
    assert ours.returncode == 0, ours.stderr[-3000:]
    conv = _run(["tools/convert_to_hf.py", "--load", str(root / "ckpt"), "--out", str(root / "hf")])
    assert conv.returncode == 0, conv.stderr[-3000:]
    hf = _run(["-m", "megatron_tempnet.generate", "--hf", str(root / "hf"), "--greedy", *common])
    assert hf.returncode == 0, hf.stderr[-3000:]
    a = [json.loads(line) for line in ours.stdout.splitlines() if line.startswith("{")]
    b = [json.loads(line) for line in hf.stdout.splitlines() if line.startswith("{")]
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert x["prompt"] == y["prompt"] and x["token_ids"] == y["token_ids"] and len(x["token_ids"]) == 5
        # (texts are not compared: a half-trained model emits byte pieces that are not UTF-8, which
        # sentencepiece and transformers' ByteFallback render with different numbers of U+FFFD)
        torch.testing.assert_close(torch.tensor(x["taus"]), torch.tensor(y["taus"]), atol=1e-4, rtol=0)
        assert all(0.01 <= t <= 2.0 for t in x["taus"])  # tiny_llama.yaml's tau bounds
    # sampling with a seed is reproducible and the same on both; --print-tau lists every token
    sample = ["--top-k", "20", "--top-p", "0.9", "--seed", "7", "--print-tau", "--prompt", "import os",
              "--max-new-tokens", "4", "--ignore-eos"]
    s1 = _run(["-m", "megatron_tempnet.generate", "--hf", str(root / "hf"), *sample])
    s2 = _run(["-m", "megatron_tempnet.generate", "--load", str(root / "ckpt"), *sample])
    assert s1.returncode == 0 and s2.returncode == 0, s1.stderr[-2000:] + s2.stderr[-2000:]
    rows = lambda out: [line.split()[:2] for line in out.splitlines() if line.strip()[:1].isdigit()]  # noqa: E731
    assert len(rows(s1.stdout)) == 4 and rows(s1.stdout) == rows(s2.stdout)


@pytest.mark.slow
def test_generate_cli_errors_name_the_fix(trained, tmp_path):
    missing = _run(["-m", "megatron_tempnet.generate", "--load", str(tmp_path / "nope"), "--prompt", "x"])
    assert missing.returncode == 2 and "does not exist; check the path" in missing.stderr
    assert "Traceback" not in missing.stderr
    long = _run(["-m", "megatron_tempnet.generate", "--load", str(trained / "ckpt"), "--prompt-ids", "1 2 3",
                 "--max-new-tokens", "40"])
    assert long.returncode == 2 and "exceeds the model's 32 positions" in long.stderr


@pytest.mark.slow
def test_generate_ignores_a_master_port_in_use(trained):
    """A lone generation process picks its own free port: the shell of a training job (or a test process) may
    export a MASTER_PORT that a live process group listens on."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(busy.getsockname()[1]))
        proc = subprocess.run([sys.executable, "-m", "megatron_tempnet.generate", "--load", str(trained / "ckpt"),
                               "--prompt-ids", "5 6 7", "--max-new-tokens", "2", "--json"], capture_output=True,
                              text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
