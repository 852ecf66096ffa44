"""Adaptive Decoder: the head, the LPO loss and its training signal, the task mixture and its reward, reward
checks, sampling through the LM at TP = 1, and the errors for bad input."""
import math
import random

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is faster, and far faster when the machine is busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# -- temperature set, head ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("temps, needle", [
    ([0.0, -0.2, 1.0], "temperature -0.2 in the temperature set is negative; temperatures must be >= 0"),
    ([], "the temperature set is empty"),
    ([0.5], "has one temperature"),
    ([0.0, 0.5, 0.5], "appears twice"),
    ([0.0, float("nan")], "not finite"),
    ([0.0, "warm"], "is not a number"),
])
def test_bad_temperature_sets_are_refused(temps, needle):
    from megatron_tempnet.adaptive.head import AdaptiveDecoderHead, check_temperatures
    from megatron_tempnet.adaptive.lm import AdaptiveError

    with pytest.raises(AdaptiveError, match=needle):
        check_temperatures(temps)
    with pytest.raises(AdaptiveError, match=needle):
        AdaptiveDecoderHead(8, temps)


def test_negative_temperature_error_says_the_fix():
    from megatron_tempnet.adaptive.head import check_temperatures
    from megatron_tempnet.adaptive.lm import AdaptiveError

    with pytest.raises(AdaptiveError) as err:
        check_temperatures([0, -1])
    assert "0 means greedy" in str(err.value) and "--temperatures 0 0.2" in str(err.value)


def test_head_starts_uniform_and_round_trips(tmp_path):
    from megatron_tempnet.adaptive.head import AdaptiveDecoderHead
    from megatron_tempnet.adaptive.lm import AdaptiveError

    head = AdaptiveDecoderHead(16, [0, 0.5, 1.0], "sequence", head_hidden_size=8, seed=3)
    h = torch.randn(5, 7, 16)
    logp = head(h)
    assert logp.shape == (5, 7, 3)
    torch.testing.assert_close(logp, torch.full_like(logp, -math.log(3)))
    g = torch.Generator().manual_seed(0)
    k = head.choose(h, generator=g)
    assert k.shape == (5, 7) and int(k.min()) >= 0 and int(k.max()) <= 2
    with torch.no_grad():
        head.mlp[-1].bias.copy_(torch.tensor([0.0, 3.0, 0.0]))
    assert torch.all(head.choose(h, sample=False) == 1)
    head.save(str(tmp_path / "h"), {"note": 1})
    again = AdaptiveDecoderHead.load(str(tmp_path / "h"))
    assert again.mode == "sequence" and again.temperatures.tolist() == [0, 0.5, 1.0]
    torch.testing.assert_close(again(h), head(h))
    with pytest.raises(AdaptiveError, match="holds no Adaptive Decoder head"):
        AdaptiveDecoderHead.load(str(tmp_path))
    with pytest.raises(AdaptiveError, match="--mode must be 'token'"):
        AdaptiveDecoderHead(16, [0, 1], "paragraph")


# -- LPO -----------------------------------------------------------------------------------------------------------


def _resp(hidden, choices):
    from megatron_tempnet.adaptive.sampling import Response

    return Response(prompt=[1], tokens=[2] * len(choices), temperatures=[0.0] * len(choices), choices=list(choices),
                    hidden=hidden)


def test_lpo_loss_is_dpo_on_summed_latent_logprobs():
    import copy

    from megatron_tempnet.adaptive.head import AdaptiveDecoderHead
    from megatron_tempnet.adaptive.lpo import latent_logprob, lpo_loss

    torch.manual_seed(0)
    head = AdaptiveDecoderHead(6, [0, 0.5, 1.0], head_hidden_size=5)
    ref = copy.deepcopy(head)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    chosen = [_resp(torch.randn(3, 6), [0, 1, 2]), _resp(torch.randn(1, 6), [2])]
    rejected = [_resp(torch.randn(2, 6), [1, 1]), _resp(torch.randn(4, 6), [0, 0, 2, 1])]
    beta = 0.3

    def by_hand(net, r):
        lp = torch.log_softmax(net.mlp(r.hidden), -1)
        return sum(lp[t, k] for t, k in enumerate(r.choices))

    torch.testing.assert_close(latent_logprob(head, chosen), torch.stack([by_hand(head, r) for r in chosen]))
    loss, stats = lpo_loss(head, ref, chosen, rejected, beta)
    want = torch.stack([
        -torch.nn.functional.logsigmoid(beta * ((by_hand(head, c) - by_hand(ref, c)) - (by_hand(head, r) - by_hand(ref, r))))
        for c, r in zip(chosen, rejected)]).mean()
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert all(p.grad is not None for p in head.parameters())
    assert all(p.grad is None for p in ref.parameters())


def test_make_pairs_best_vs_worst_and_skips_ties():
    from megatron_tempnet.adaptive.lpo import make_pairs

    groups = [["a0", "a1", "a2"], ["b0", "b1"], ["c0", "c1", "c2"]]
    chosen, rejected = make_pairs(groups, [[0.1, 0.9, 0.5], [1.0, 1.0], [0.0, 0.2, -1.0]], random.Random(0))
    assert chosen == ["a1", "c1"] and rejected == ["a0", "c2"]


def test_lpo_signal_teaches_the_head_which_temperature_fits_which_context():
    """Without an LM: two kinds of hidden state; the reward prefers temperature 0 for kind A and 1.0 for kind B.
    Pairs built from sampled choices (best vs worst) and the LPO update teach the head both."""
    from megatron_tempnet.adaptive.head import AdaptiveDecoderHead
    from megatron_tempnet.adaptive.lpo import lpo_loss, make_pairs

    torch.manual_seed(0)
    H, temps = 8, [0.0, 0.5, 1.0]
    head = AdaptiveDecoderHead(H, temps, head_hidden_size=16)
    import copy

    ref = copy.deepcopy(head)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    centre = {"A": torch.randn(H), "B": torch.randn(H)}
    g = torch.Generator().manual_seed(1)
    rng = random.Random(0)
    kinds = ["A", "B"] * 4
    for _ in range(40):
        hid = torch.stack([centre[k] for k in kinds])[:, None, None] + 0.1 * torch.randn(8, 8, 4, H)  # 8 x 8 x 4 tokens
        ks = head.choose(hid, generator=g)
        temp = torch.tensor(temps)[ks].mean(-1)  # [prompt, response]
        rewards = [(1 - temp[i] if k == "A" else temp[i]).tolist() for i, k in enumerate(kinds)]
        groups = [[_resp(hid[i, j], ks[i, j].tolist()) for j in range(8)] for i in range(8)]
        chosen, rejected = make_pairs(groups, rewards, rng)
        if not chosen:  # every group tied: the head already decides
            continue
        loss, _ = lpo_loss(head, ref, chosen, rejected, beta=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert int(head.choose(centre["A"], sample=False)) == 0
    assert int(head.choose(centre["B"], sample=False)) == 2


# -- the task mixture ------------------------------------------------------------------------------------------------


def test_mixture_rewards():
    from megatron_tempnet.adaptive import tasks

    assert tasks.mixture_reward("<copy> s1 s2 s3 s4 s5 <sep>", ["s1 s2 s3 s4 s5", "s1 s2 s3 s4 s5 <eos>", "s1 s2 s3 s4",
                                                               "s2 s2 s3 s4 s5"]) == [1.0, 1.0, 0.0, 0.0]
    assert tasks.mixture_reward("<count> s30 <sep>", ["s31 s0 s1 s2 s3", "s31 s1 s2 s3 s4"]) == [1.0, 0.0]
    # varied: identical samples score 0; all-different valid samples score 1; invalid symbols score 0
    opts = tasks.class_options(3)
    same = " ".join(f"s{opts[0]}" for _ in range(5))
    assert tasks.mixture_reward("<name> s3 <sep>", [same] * 4) == [0.0] * 4
    diff = [" ".join(f"s{opts[(i + p) % 8]}" for p in range(5)) for i in range(4)]
    assert tasks.mixture_reward("<name> s3 <sep>", diff) == [1.0] * 4
    bad = [s for s in range(32) if s not in opts][0]
    r = tasks.mixture_reward("<name> s3 <sep>", [" ".join([f"s{bad}"] * 5)] + diff[1:])
    assert r[0] == 0.0 and all(x > 0 for x in r[1:])
    rhyme = ["s6 s7 s8 s9 s10", "s7 s8 s9 s10 s11"]
    assert tasks.mixture_reward("<rhyme> s5 <sep>", rhyme) == [1.0, 1.0]
    assert tasks.mixture_reward("<rhyme> s5 <sep>", ["s5 s5 s5 s5 s5", rhyme[0]])[0] == 0.0  # +0 is not a rhyme


def test_mixture_corpus_and_the_fixed_temperature_tradeoff():
    from megatron_tempnet.adaptive import tasks

    tok = tasks.MixtureTokenizer()
    ds = tasks.MixtureCorpus(50, 16, seed=0)
    item = ds[7]
    assert item["tokens"].shape == (16,) and torch.equal(item["tokens"][1:], item["labels"][:-1])
    text = tok.detokenize(item["tokens"].tolist())
    assert text.split()[0] in tasks.TAGS.values() and "<eos>" in tok.detokenize(item["labels"].tolist())
    assert int(item["loss_mask"].sum()) == tasks.ANSWER_LENGTH + 1
    assert tok.tokenize(tok.detokenize([3, 9, 2])) == [3, 9, 2]
    with pytest.raises(ValueError, match="not in the task mixture's vocabulary"):
        tok.tokenize("<copy> hello")
    # no fixed temperature is good for both kinds, while the right one per kind scores ~0.9
    fixed = [tasks.expected_fixed_temperature_rewards(t) for t in (0, 0.2, 0.4, 0.6, 0.8, 1.0)]
    best_fixed = max((f["deterministic"] + f["varied"]) / 2 for f in fixed)
    oracle = (fixed[0]["deterministic"] + fixed[-1]["varied"]) / 2
    assert best_fixed <= 0.5 < 0.85 < oracle
    prompts = tasks.make_prompts(8, seed=1)
    assert [tasks.task_of(p) for p in prompts] == list(tasks.TASKS) * 2


# -- reward functions ----------------------------------------------------------------------------------------------

def _raises(prompt, responses):
    raise KeyError("score table")


def _nan(prompt, responses):
    return [0.5] + [float("nan")] * (len(responses) - 1)


def _short(prompt, responses):
    return [1.0]


def _words(prompt, responses):
    return ["good"] * len(responses)


@pytest.mark.parametrize("fn, needle", [
    (_raises, r"raised KeyError: 'score table' \(prompt 'p'.*fix the function"),
    (_nan, r"returned nan for response 1 \('b'\) of prompt 'p'; rewards must be finite numbers"),
    (_short, "returned 1 rewards for 2 responses"),
    (_words, "returned 'good' for response 0"),
])
def test_bad_reward_functions_are_named(fn, needle):
    from megatron_tempnet.adaptive.lm import AdaptiveError
    from megatron_tempnet.adaptive.rewards import RewardFunction

    with pytest.raises(AdaptiveError, match=needle):
        RewardFunction(fn, "my:fn")("p", ["a", "b"])


def test_load_reward_specs(tmp_path):
    from megatron_tempnet.adaptive.lm import AdaptiveError
    from megatron_tempnet.adaptive.rewards import BUILTIN, load_reward

    r = load_reward(BUILTIN)
    assert r("<count> s1 <sep>", ["s2 s3 s4 s5 s6"]) == [1.0]
    f = tmp_path / "my_reward.py"
    f.write_text("def score(prompt, responses):\n    return [float(len(r)) for r in responses]\n")
    assert load_reward(f"{f}:score")("x", ["ab", "abc"]) == [2.0, 3.0]
    with pytest.raises(AdaptiveError, match="has no callable named 'nope'"):
        load_reward(f"{f}:nope")
    with pytest.raises(AdaptiveError, match="cannot import no_such_module_xyz"):
        load_reward("no_such_module_xyz:f")
    with pytest.raises(AdaptiveError, match="neither 'module:function'"):
        load_reward("just_a_name")
    with pytest.raises(AdaptiveError, match="file .* not found"):
        load_reward(str(tmp_path / "missing.py") + ":f")


# -- sampling through the LM (TP = 1) ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm(single_rank):
    """An untrained tiny LM of the mixture's vocabulary (sampling plumbing, not quality)."""
    from megatron_tempnet.adaptive.lm import LanguageModel, mixture_lm_config
    from megatron_tempnet.adaptive.tasks import MixtureTokenizer
    from megatron_tempnet.models.build import build_model_chunks

    cfg = mixture_lm_config(model__hidden_size=32, model__num_layers=2, model__seq_length=16)
    (model,) = build_model_chunks(cfg)
    return LanguageModel(model, cfg, MixtureTokenizer())


def test_lm_forward_gives_true_vocab_logits_and_the_output_layers_input(tiny_lm):
    tokens = torch.tensor([[3, 10, 2], [4, 11, 2]])
    logits, tau, hidden = tiny_lm.forward(tokens)
    assert logits.shape == (2, 3, tiny_lm.vocab_size) and tau is None and hidden.shape == (2, 3, 32)
    assert tiny_lm.cfg.model.make_vocab_size_divisible_by == 8 and tiny_lm.vocab_size == 39  # padded to 40
    w = tiny_lm.model.shared_embedding_or_output_weight()[: tiny_lm.vocab_size]
    torch.testing.assert_close(logits, hidden @ w.T, rtol=1e-4, atol=1e-4)  # tied GPT output layer


def test_generate_fixed_head_and_sequence_mode(tiny_lm):
    from megatron_tempnet.adaptive.head import AdaptiveDecoderHead
    from megatron_tempnet.adaptive.sampling import generate

    prompts = [[3, 10, 11, 12, 13, 14, 2], [5, 9, 2], [6, 8, 2]]
    greedy = generate(tiny_lm, prompts, 0.0, max_new_tokens=5)
    # greedy equals an argmax loop over the model's own logits
    seq = torch.tensor([prompts[1]])
    for _ in range(5):
        logits, _, _ = tiny_lm.forward(seq)
        nxt = int(logits[0, -1].argmax())
        seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
        if nxt == tiny_lm.eos:
            break
    assert greedy[1].tokens == seq[0, 3:].tolist()
    assert all(r.temperatures == [0.0] * len(r.tokens) for r in greedy)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = generate(tiny_lm, prompts, 1.0, max_new_tokens=5, generator=g1)
    b = generate(tiny_lm, prompts, 1.0, max_new_tokens=5, generator=g2)
    assert [r.tokens for r in a] == [r.tokens for r in b]  # seeded

    head = AdaptiveDecoderHead(tiny_lm.hidden_size, [0.0, 0.5, 1.0], "token", head_hidden_size=8)
    out = generate(tiny_lm, prompts, head, max_new_tokens=5, generator=g1, keep_hidden=True)
    for r in out:
        assert len(r.choices) == len(r.tokens) == len(r.temperatures) == r.hidden.shape[0]
        assert r.temperatures == [[0.0, 0.5, 1.0][k] for k in r.choices]
        assert tiny_lm.eos not in r.tokens[:-1]
    with torch.no_grad():  # a head sure of temperature 0; exploration still draws the others
        head.mlp[-1].bias.copy_(torch.tensor([20.0, 0.0, 0.0]))
    sure = generate(tiny_lm, prompts * 4, head, max_new_tokens=3, generator=g1)
    assert {k for r in sure for k in r.choices} == {0}
    explored = generate(tiny_lm, prompts * 4, head, max_new_tokens=3, generator=g1, explore=1.0)
    assert {k for r in explored for k in r.choices} == {0, 1, 2}
    seq_head = AdaptiveDecoderHead(tiny_lm.hidden_size, [0.0, 0.5, 1.0], "sequence", head_hidden_size=8)
    out = generate(tiny_lm, prompts * 3, seq_head, max_new_tokens=5, generator=g1, keep_hidden=True)
    for r in out:
        assert len(r.choices) == 1 and r.hidden.shape[0] == 1 and len(set(r.temperatures)) == 1


def test_bad_prompts_are_refused(tiny_lm):
    from megatron_tempnet.adaptive.lm import AdaptiveError
    from megatron_tempnet.adaptive.sampling import generate

    with pytest.raises(AdaptiveError, match=r"prompt 1 \(#1\) is empty"):
        generate(tiny_lm, [[3, 2], []], 0.0, max_new_tokens=4)
    with pytest.raises(AdaptiveError, match=r"prompt 0 \(#0\) has 14 tokens; with --max-new-tokens 4 it needs 18 "
                                            r"positions but the model's context is 16. Shorten the prompt to at most 12 "
                                            r"tokens or lower --max-new-tokens to at most 2"):
        generate(tiny_lm, [[3] * 14], 0.0, max_new_tokens=4)
    with pytest.raises(AdaptiveError, match="needs an LM trained with --tempnet-enabled"):
        generate(tiny_lm, [[3, 2]], "tempnet", max_new_tokens=2)
    with pytest.raises(AdaptiveError, match="negative"):
        generate(tiny_lm, [[3, 2]], -0.5, max_new_tokens=2)
    with pytest.raises(AdaptiveError, match="no prompts"):
        generate(tiny_lm, [], 0.0, max_new_tokens=2)


def test_lpo_steps_and_evaluation_plumbing(tiny_lm):
    from megatron_tempnet.adaptive import tasks
    from megatron_tempnet.adaptive.head import AdaptiveDecoderHead
    from megatron_tempnet.adaptive.lm import AdaptiveError
    from megatron_tempnet.adaptive.lpo import LPOSettings, evaluate, train_lpo
    from megatron_tempnet.adaptive.rewards import RewardFunction, load_reward
    from megatron_tempnet.adaptive.train import format_table

    reward = load_reward("megatron_tempnet.adaptive.tasks:mixture_reward")
    group = lambda p: tasks.TASKS[tasks.task_of(p)]  # noqa: E731
    head = AdaptiveDecoderHead(tiny_lm.hidden_size, [0.0, 1.0], "token", head_hidden_size=8)
    before = [p.detach().clone() for p in head.parameters()]
    s = LPOSettings(steps=2, prompts_per_step=4, samples_per_prompt=3, max_new_tokens=6, lr=1e-2)
    hist = train_lpo(tiny_lm, head, lambda step: tasks.make_prompts(4, step), reward, s, group_of=group)
    assert len(hist) == 2 and set(hist[0]["temperature"]) == {"deterministic", "varied"}
    if any(h["pairs"] for h in hist):
        assert any(not torch.equal(a, b) for a, b in zip(before, head.parameters()))
    res = evaluate(tiny_lm, tasks.make_prompts(4, 99), reward, {"fixed tau = 0": (0.0, "sample"),
                                                                 "adaptive": (head, "argmax")}, 2, 6, group_of=group)
    assert res["fixed tau = 0"]["temperature"] == 0.0 and len(res["adaptive"]["choices_by_group"]["varied"]) == 2
    assert "| adaptive |" in format_table(res)
    nan_reward = RewardFunction(lambda p, rs: [float("nan")] * len(rs), "tests:nan_reward")
    with pytest.raises(AdaptiveError, match="tests:nan_reward returned nan"):
        train_lpo(tiny_lm, head, lambda step: tasks.make_prompts(2, step), nan_reward, s)
    with pytest.raises(AdaptiveError, match=r"prompt 0 \(''\) is empty"):
        train_lpo(tiny_lm, head, lambda step: [""], reward, s)
    with pytest.raises(AdaptiveError, match="--samples-per-prompt must be >= 2"):
        train_lpo(tiny_lm, head, lambda step: ["x"], reward, LPOSettings(samples_per_prompt=1))
