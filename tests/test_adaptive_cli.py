"""tools/train_adaptive_decoder.py end to end on the task mixture (a tiny LM, a few LPO steps), the picture of the
trained head's choices, your own prompts and reward on a saved LM, and the errors for bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "train_adaptive_decoder.py")


def _run(args, timeout=600):
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The CLI on the mixture: a 30-step LM, 3 LPO steps, a 4-prompt table."""
    out = tmp_path_factory.mktemp("ad") / "run"
    r = _run([TOOL, "--config", "examples/configs/adaptive_decoder.yaml", "--lm-steps", "30", "--steps", "3",
              "--eval-prompts", "4", "--eval-samples", "3", "--log-interval", "1", "--mode", "sequence", "--save", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


@pytest.mark.slow
def test_cli_trains_saves_and_prints_the_table(trained):
    from megatron_tempnet.adaptive.head import AdaptiveDecoderHead

    out, stdout = trained
    assert "LPO step 3/3" in stdout and "| adaptive (sequence, argmax) |" in stdout
    for t in ("0", "0.2", "0.4", "0.6", "0.8", "1"):
        assert f"| fixed tau = {t} |" in stdout
    head = AdaptiveDecoderHead.load(str(out))
    assert head.mode == "sequence" and head.temperatures.tolist() == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    info = json.loads((out / "adaptive_decoder.json").read_text())
    assert info["config"]["steps"] == 3 and set(info["results"]) >= {"fixed tau = 0", "adaptive (sequence, sampled)"}
    assert len(json.loads((out / "history.json").read_text())) == 3
    assert (out / "table.md").read_text().startswith("| decoding | mean reward |")
    assert (out / "lm" / "latest_checkpointed_iteration.txt").is_file()


@pytest.mark.slow
def test_shading_the_heads_choices(trained, tmp_path):
    out, _ = trained
    r = _run([os.path.join(REPO, "tools", "shade_tokens.py"), "--load", str(out / "lm"), "--task-mixture",
              "--head", str(out), "--prompt", "<name> s3 <sep>", "--max-new-tokens", "6", "--latent", "sample",
              "--html", str(tmp_path / "h.html"), "--png", str(tmp_path / "h.png"), "--save-json", str(tmp_path / "h.json")])
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "h.json").read_text())
    assert data["tokens"][0] == "<name> s3 <sep>" and data["temperatures"][0] is None
    gen = data["temperatures"][1:]
    assert 1 <= len(gen) <= 6 and len(set(gen)) == 1  # sequence mode: one temperature per response
    assert gen[0] in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) and (data["vmin"], data["vmax"]) == (0.0, 1.0)
    assert (tmp_path / "h.png").stat().st_size > 0


@pytest.mark.slow
def test_own_prompts_and_reward_and_their_errors(trained, tmp_path):
    """In this process (run() is what the CLI calls): the saved LM with a prompt file and a reward file."""
    from megatron_tempnet.adaptive.config import load_adaptive_config
    from megatron_tempnet.adaptive.lm import AdaptiveError
    from megatron_tempnet.adaptive.train import run

    out, _ = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("<count> s3 <sep>\n<name> s9 <sep>\n")
    reward = tmp_path / "my_reward.py"
    reward.write_text("def length(prompt, responses):\n    return [float(len(r.split())) for r in responses]\n"
                      "def broken(prompt, responses):\n    raise RuntimeError('no judge today')\n"
                      "def nan(prompt, responses):\n    return [float('nan')] * len(responses)\n")
    common = ["--task-mixture", "--checkpoint", str(out / "lm"), "--prompts", str(prompts), "--steps", "2",
              "--prompts-per-step", "2", "--samples-per-prompt", "2", "--eval-samples", "2", "--threads", "1"]
    n = torch.get_num_threads()
    try:
        res = run(load_adaptive_config(common + ["--reward", f"{reward}:length"]), log=lambda m: None)
        assert len(res["history"]) == 2 and "| fixed tau = 0 |" in res["table"] and "reward: all" in res["table"]
        for fn, needle in (("broken", "raised RuntimeError: no judge today"),
                           ("nan", "returned nan for response 0")):
            with pytest.raises(AdaptiveError, match=needle):
                run(load_adaptive_config(common + ["--reward", f"{reward}:{fn}"]), log=lambda m: None)
        empty = tmp_path / "empty.txt"
        empty.write_text("<count> s3 <sep>\n\n<name> s9 <sep>\n")
        with pytest.raises(AdaptiveError, match="empty.txt:2: the prompt is empty; remove empty lines"):
            run(load_adaptive_config(common + ["--reward", f"{reward}:length", "--prompts", str(empty)]))
        long = tmp_path / "long.txt"
        long.write_text("<copy> " + "s1 " * 12 + "<sep>\n")
        with pytest.raises(AdaptiveError, match="has 14 tokens; with --max-new-tokens 6 it needs 20 positions but the "
                                                "model's context is 16. Shorten the prompt to at most 10 tokens"):
            run(load_adaptive_config(common + ["--reward", f"{reward}:length", "--prompts", str(long)]))
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("args, needle", [
    (["--task-mixture", "--temperatures", "0", "-0.5", "1"],
     "temperature -0.5 in the temperature set is negative; temperatures must be >= 0"),
    (["--checkpoint", "x", "--reward", "m:f"], "no prompts: pass --prompts FILE"),
    (["--task-mixture", "--reward", "no_such_module_q:f"], "cannot import no_such_module_q"),
    (["--task-mixture", "--prompts", "/no/such/prompts.txt"], "prompt file /no/such/prompts.txt not found"),
    (["--task-mixture", "--mode", "paragraph"], "--mode must be 'token'"),
])
def test_bad_settings_are_refused_before_any_work(args, needle):
    from megatron_tempnet.adaptive.config import load_adaptive_config
    from megatron_tempnet.adaptive.lm import AdaptiveError
    from megatron_tempnet.adaptive.train import run

    with pytest.raises(AdaptiveError, match=needle.replace("(", "\\(")):
        run(load_adaptive_config(args + ["--threads", str(torch.get_num_threads())]))


def test_cli_error_exit():
    r = _run([TOOL, "--task-mixture", "--temperatures", "0", "-0.5", "1"], timeout=120)
    assert r.returncode == 2 and "error: temperature -0.5 in the temperature set is negative" in r.stderr
    assert "Traceback" not in r.stderr


def test_yaml_keys_are_checked(tmp_path):
    from megatron_tempnet.adaptive.config import load_adaptive_config
    from megatron_tempnet.adaptive.lm import AdaptiveError

    cfg = load_adaptive_config(["--config", os.path.join(REPO, "examples", "configs", "adaptive_decoder.yaml"),
                                "--beta", "0.3"])
    assert cfg.task_mixture and cfg.beta == 0.3 and cfg.temperatures == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("task_mixture: true\ntemperature: [0, 1]\n")
    with pytest.raises(AdaptiveError, match="unknown key 'temperature' \\(did you mean 'temperatures'\\?\\)"):
        load_adaptive_config(["--config", str(bad)])


def test_reward_model_folder(tmp_path):
    """A Hugging Face sequence-classification model as the reward: one finite score per response."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    from megatron_tempnet.adaptive.rewards import load_reward

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<copy>", "<sep>", "<eos>"] + [f"s{i}" for i in range(32)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>")
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(vocab), n_positions=32, n_embd=16, n_layer=1,
                                                     n_head=2, num_labels=1, pad_token_id=1))
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    reward = load_reward(str(tmp_path / "rm"))
    scores = reward("<copy> s1 s2 <sep>", ["s1 s2", "s2 s2 s2", "s1"])
    assert len(scores) == 3 and all(isinstance(x, float) for x in scores)
    assert scores == reward("<copy> s1 s2 <sep>", ["s1 s2", "s2 s2 s2", "s1"])  # deterministic
    with torch.no_grad():  # the score is the model's logit on prompt + response
        enc = tok(["<copy> s1 s2 <sep> s1"], return_tensors="pt")
        assert scores[2] == pytest.approx(float(model.eval()(**enc).logits[0, 0]), abs=1e-5)
