"""The built-in task mixture: prompts whose right temperature is known.

Four tasks over a small symbolic vocabulary. A task tag token opens every prompt, so a head on the LM's
hidden state can tell which kind of prompt it is answering.

deterministic (the reward is the exact continuation; greedy decoding is right):
  copy    <copy> a b c d e <sep>   ->  a b c d e <eos>
  count   <count> a <sep>          ->  a+1 a+2 a+3 a+4 a+5 <eos>      (symbols are numbers mod M)
varied (the reward is the distinctness of several samples; sampling at the LM's own temperature is right):
  name    <name> c <sep>           ->  five symbols drawn i.i.d. from the 8 symbols of class c
                                       (c + 0, 4, 7, 11, 14, 18, 21, 25 mod M)
  rhyme   <rhyme> a <sep>          ->  five symbols, each prev + k (mod M), k in 1..8

The LM learns these from a corpus in which
- the deterministic answers are noisy: each answer symbol of `copy` is its neighbour (x + 1) with
  probability `noise` (0.3), and each step of `count` is +2 instead of +1 with that probability. The LM
  learns a 0.7 / 0.3 split, so sampling at temperature 1 makes mistakes and greedy decoding does not;
- the varied answers follow a Zipf law over their 8 options (p ~ 1/rank), so a low temperature collapses
  onto the most likely symbol and the samples stop being distinct.
Both kinds of next-token distribution are about equally peaked; only the tag says which reward applies,
so no single temperature is best for both (greedy is perfect on one half and worthless on the other).

Rewards (`mixture_reward`, a reward callable like any user's: (prompt text, response texts) -> floats):
  deterministic: 1.0 when the response (up to <eos>) is exactly the answer, else 0.0;
  varied: mean over the 5 positions of [symbol allowed] x (fraction of the other responses to the same
  prompt whose symbol at that position differs). The mean over a group is its distinctness; identical
  samples score 0.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

SPECIALS = ["<pad>", "<eos>", "<sep>"]
TASKS = {"copy": "deterministic", "count": "deterministic", "name": "varied", "rhyme": "varied"}
TAGS = {name: f"<{name}>" for name in TASKS}
NUM_SYMBOLS = 32  # M
ANSWER_LENGTH = 5
OPTIONS = 8  # choices per position in the varied tasks
ZIPF = [1.0 / (r + 1) for r in range(OPTIONS)]
NOISE = 0.3
CLASS_OFFSETS = (0, 4, 7, 11, 14, 18, 21, 25)
MAX_PROMPT_LENGTH = 2 + ANSWER_LENGTH  # <copy> + 5 symbols + <sep>
MAX_NEW_TOKENS = ANSWER_LENGTH + 1  # 5 symbols + <eos>


class MixtureTokenizer:
    """Whitespace tokenizer over the mixture's vocabulary (pad, eos, sep, one tag per task, s0..s31).

    Same interface as the project's tokenizers (tokenize, detokenize, id_to_piece, eod, vocab_size)."""

    def __init__(self):
        self.pieces = SPECIALS + [TAGS[t] for t in TASKS] + [f"s{i}" for i in range(NUM_SYMBOLS)]
        self.ids = {p: i for i, p in enumerate(self.pieces)}

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    @property
    def eod(self) -> int:
        return self.ids["<eos>"]

    eos = eod

    @property
    def pad(self) -> int:
        return self.ids["<pad>"]

    def symbol(self, i: int) -> int:
        return self.ids[f"s{i % NUM_SYMBOLS}"]

    def tokenize(self, text: str) -> List[int]:
        out = []
        for piece in text.split():
            if piece not in self.ids:
                raise ValueError(f"'{piece}' is not in the task mixture's vocabulary "
                                 f"(pieces: <pad> <eos> <sep> {' '.join(TAGS.values())} s0..s{NUM_SYMBOLS - 1})")
            out.append(self.ids[piece])
        return out

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(self.pieces[int(i)] if 0 <= int(i) < len(self.pieces) else f"<{int(i)}?>" for i in ids)

    def id_to_piece(self, i: int) -> str:
        return self.pieces[int(i)]


def class_options(c: int) -> List[int]:
    """The 8 symbols of class c for `name`, most likely first: c + a fixed set of offsets (mod M)."""
    return [(c + k) % NUM_SYMBOLS for k in CLASS_OFFSETS]


def rhyme_options(prev: int) -> List[int]:
    """The symbols that may follow `prev` in `rhyme`, most likely first."""
    return [(prev + k) % NUM_SYMBOLS for k in range(1, OPTIONS + 1)]


@dataclass
class Example:
    task: str
    prompt: List[int]  # symbol numbers (not token ids) after the tag
    answer: List[int]  # symbol numbers; for varied tasks one sample of the corpus distribution

    @property
    def kind(self) -> str:
        return TASKS[self.task]


def _zipf(rng: random.Random, options: List[int]) -> int:
    return rng.choices(options, weights=ZIPF)[0]


def sample_example(rng: random.Random, task: Optional[str] = None, noise: float = NOISE) -> Example:
    """One example of the corpus (noisy / Zipf answers) for `task` (default: a task drawn uniformly)."""
    task = task or rng.choice(list(TASKS))
    M = NUM_SYMBOLS
    if task == "copy":
        seq = [rng.randrange(M) for _ in range(ANSWER_LENGTH)]
        ans = [(x + 1) % M if rng.random() < noise else x for x in seq]
        return Example(task, seq, ans)
    a = rng.randrange(M)
    if task == "count":
        ans, prev = [], a
        for _ in range(ANSWER_LENGTH):
            prev = (prev + (2 if rng.random() < noise else 1)) % M
            ans.append(prev)
        return Example(task, [a], ans)
    if task == "name":
        opts = class_options(a)
        return Example(task, [a], [_zipf(rng, opts) for _ in range(ANSWER_LENGTH)])
    if task == "rhyme":
        ans, prev = [], a
        for _ in range(ANSWER_LENGTH):
            prev = _zipf(rng, rhyme_options(prev))
            ans.append(prev)
        return Example(task, [a], ans)
    raise ValueError(f"unknown task {task!r}; the mixture has {', '.join(TASKS)}")


def prompt_text(ex: Example) -> str:
    return " ".join([TAGS[ex.task]] + [f"s{x}" for x in ex.prompt] + ["<sep>"])


def answer_text(ex: Example) -> str:
    return " ".join([f"s{x}" for x in ex.answer] + ["<eos>"])


def make_prompts(n: int, seed: int, tasks: Sequence[str] = tuple(TASKS)) -> List[str]:
    """n prompts, cycling through `tasks` (equal shares), from a seeded generator."""
    rng = random.Random(seed)
    return [prompt_text(sample_example(rng, tasks[i % len(tasks)])) for i in range(n)]


def task_of(prompt: str) -> str:
    tag = prompt.split()[0] if prompt.split() else ""
    for name, t in TAGS.items():
        if t == tag:
            return name
    raise ValueError(f"prompt {prompt!r} does not start with a task tag ({', '.join(TAGS.values())})")


def _symbols(text: str) -> List[Optional[int]]:
    """Symbol numbers of a response up to its first <eos> (None for a non-symbol piece)."""
    out = []
    for piece in text.split():
        if piece == "<eos>":
            break
        out.append(int(piece[1:]) if piece[:1] == "s" and piece[1:].isdigit() else None)
    return out


def expected_answer(prompt: str) -> Optional[List[int]]:
    """The right answer of a deterministic prompt (None for a varied one)."""
    task = task_of(prompt)
    args = _symbols(" ".join(prompt.split()[1:-1]))
    if task == "copy":
        return list(args)
    if task == "count":
        return [(args[0] + i) % NUM_SYMBOLS for i in range(1, ANSWER_LENGTH + 1)]
    return None


def allowed(prompt: str, symbols: List[Optional[int]]) -> List[bool]:
    """Whether each position of a varied answer holds an allowed symbol (first ANSWER_LENGTH positions)."""
    task = task_of(prompt)
    a = _symbols(" ".join(prompt.split()[1:-1]))[0]
    ok, prev = [], a
    for p in range(ANSWER_LENGTH):
        s = symbols[p] if p < len(symbols) else None
        opts = class_options(a) if task == "name" else rhyme_options(prev)
        ok.append(s is not None and s in opts)
        prev = s if s is not None else prev
    return ok


def mixture_reward(prompt: str, responses: List[str]) -> List[float]:
    """Rewards of the responses to one prompt (see the module docstring)."""
    task = task_of(prompt)
    parsed = [_symbols(r) for r in responses]
    if TASKS[task] == "deterministic":
        want = expected_answer(prompt)
        return [1.0 if p == want else 0.0 for p in parsed]
    n = len(parsed)
    out = []
    for i, p in enumerate(parsed):
        ok = allowed(prompt, p)
        total = 0.0
        for pos in range(ANSWER_LENGTH):
            if not ok[pos] or n < 2:
                continue
            mine = p[pos]
            differ = sum(1 for j, q in enumerate(parsed) if j != i and (pos >= len(q) or q[pos] != mine))
            total += differ / (n - 1)
        out.append(total / ANSWER_LENGTH)
    return out


# -- the LM's training corpus ------------------------------------------------------------------------------


class MixtureCorpus(torch.utils.data.Dataset):
    """One example per sample, padded to seq_length: {"tokens", "labels", "loss_mask"} (the trainer's item
    format). The loss covers the answer and its <eos> only (the prompts are random)."""

    def __init__(self, num_samples: int, seq_length: int, seed: int, noise: float = NOISE):
        if seq_length < MAX_PROMPT_LENGTH + MAX_NEW_TOKENS:
            raise ValueError(f"the mixture needs --seq-length >= {MAX_PROMPT_LENGTH + MAX_NEW_TOKENS}")
        self.tok = MixtureTokenizer()
        self.num_samples, self.seq_length, self.seed, self.noise = num_samples, seq_length, seed, noise

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        rng = random.Random(self.seed * 1_000_003 + int(idx))
        ex = sample_example(rng, noise=self.noise)
        prompt = self.tok.tokenize(prompt_text(ex))
        answer = self.tok.tokenize(answer_text(ex))
        seq = prompt + answer
        pad = self.seq_length + 1 - len(seq)
        ids = torch.tensor(seq + [self.tok.pad] * pad)
        mask = torch.zeros(self.seq_length)
        mask[len(prompt) - 1: len(seq) - 1] = 1.0  # positions whose next token is an answer token
        return {"tokens": ids[:-1], "labels": ids[1:], "loss_mask": mask}


def expected_fixed_temperature_rewards(tau: float) -> Dict[str, float]:
    """What a perfect LM of the corpus would score at a fixed temperature (for reading the benchmark):
    deterministic: P(all 5 symbols right); varied: 1 - sum_k p_k^2 of the tempered Zipf law."""
    if tau == 0:
        return {"deterministic": 1.0, "varied": 0.0}
    ratio = ((1 - NOISE) / NOISE) ** (1 / tau)
    p_right = ratio / (ratio + 1)
    w = [z ** (1 / tau) for z in ZIPF]
    s = sum(w)
    return {"deterministic": p_right ** ANSWER_LENGTH, "varied": 1 - sum((x / s) ** 2 for x in w)}
