"""The Adaptive Decoder head (Dhuliawala et al. 2024, "Adaptive Decoding via Latent Preference Optimization").

A small MLP on the LM's last hidden state h (the final layernorm's output) that outputs a distribution over
K temperatures {t_1 .. t_K} (t = 0 means greedy decoding):

    p(k | h) = softmax(W3 relu(W2 relu(W1 h + b1) + b2) + b3)_k

token mode: a temperature is chosen at every generated token from that token's hidden state;
sequence mode: one temperature per response, chosen from the hidden state of the last prompt token.
The LM stays frozen; only the head is trained (LPO, lpo.py). The last layer starts at zero, so the head
starts uniform over the temperatures (every choice is explored in the first samples).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from .lm import AdaptiveError

MODES = ("token", "sequence")
DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
WEIGHTS_FILE = "adaptive_decoder.pt"
INFO_FILE = "adaptive_decoder.json"


def check_temperatures(temperatures: Sequence) -> List[float]:
    """The temperature set as floats, or an AdaptiveError that names the bad value and the fix."""
    if temperatures is None or len(temperatures) == 0:
        raise AdaptiveError("the temperature set is empty; pass at least two temperatures, "
                            "e.g. --temperatures 0 0.2 0.4 0.6 0.8 1.0")
    out = []
    for t in temperatures:
        try:
            v = float(t)
        except (TypeError, ValueError):
            raise AdaptiveError(f"temperature {t!r} in the temperature set is not a number; "
                                "pass numbers >= 0, e.g. --temperatures 0 0.5 1.0") from None
        if not math.isfinite(v):
            raise AdaptiveError(f"temperature {t!r} in the temperature set is not finite; pass numbers >= 0")
        if v < 0:
            raise AdaptiveError(f"temperature {v:g} in the temperature set is negative; temperatures must be >= 0 "
                                "(0 means greedy decoding), e.g. --temperatures 0 0.2 0.4 0.6 0.8 1.0")
        out.append(v)
    dup = sorted({v for v in out if out.count(v) > 1})
    if dup:
        raise AdaptiveError(f"temperature {dup[0]:g} appears twice in the temperature set; list each temperature once")
    if len(out) < 2:
        raise AdaptiveError(f"the temperature set {out} has one temperature, so there is nothing to choose; "
                            "pass at least two, e.g. --temperatures 0 0.2 0.4 0.6 0.8 1.0")
    return out


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise AdaptiveError(f"--mode must be 'token' (a temperature per generated token) or 'sequence' "
                            f"(one per response); got {mode!r}")
    return mode


class AdaptiveDecoderHead(torch.nn.Module):
    def __init__(self, hidden_size: int, temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
                 mode: str = "token", head_hidden_size: int = 128, seed: int = 0):
        super().__init__()
        temps = check_temperatures(temperatures)
        self.mode = check_mode(mode)
        if head_hidden_size < 1:
            raise AdaptiveError(f"--head-hidden-size must be positive; got {head_hidden_size}")
        self.hidden_size, self.head_hidden_size = hidden_size, head_hidden_size
        self.register_buffer("temperatures", torch.tensor(temps, dtype=torch.float64))  # exact values in records
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            self.mlp = torch.nn.Sequential(
                torch.nn.Linear(hidden_size, head_hidden_size), torch.nn.ReLU(),
                torch.nn.Linear(head_hidden_size, head_hidden_size), torch.nn.ReLU(),
                torch.nn.Linear(head_hidden_size, len(temps)))
        finally:
            torch.random.set_rng_state(gen_state)
        with torch.no_grad():
            self.mlp[-1].weight.zero_()
            self.mlp[-1].bias.zero_()

    @property
    def num_choices(self) -> int:
        return int(self.temperatures.numel())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> log-probabilities over the temperatures [..., K]."""
        return torch.log_softmax(self.mlp(hidden.float()), dim=-1)

    @torch.no_grad()
    def choose(self, hidden: torch.Tensor, sample: bool = True,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Indices of the chosen temperatures [...]: sampled from the head (training), or its argmax."""
        logp = self(hidden)
        if not sample:
            return logp.argmax(-1)
        flat = logp.reshape(-1, logp.size(-1)).exp()
        return torch.multinomial(flat, 1, generator=generator).reshape(logp.shape[:-1])

    # -- save / load ---------------------------------------------------------------------------------------

    def describe(self) -> dict:
        return {"hidden_size": self.hidden_size, "head_hidden_size": self.head_hidden_size, "mode": self.mode,
                "temperatures": self.temperatures.tolist()}

    def save(self, folder: str, extra: Optional[dict] = None) -> Path:
        d = Path(folder)
        d.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), d / (WEIGHTS_FILE + ".tmp"))
        (d / (WEIGHTS_FILE + ".tmp")).replace(d / WEIGHTS_FILE)
        (d / INFO_FILE).write_text(json.dumps({**self.describe(), **(extra or {})}, indent=1))
        return d

    @classmethod
    def load(cls, folder: str) -> "AdaptiveDecoderHead":
        d = Path(folder)
        if not (d / INFO_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
            raise AdaptiveError(f"{d} holds no Adaptive Decoder head ({INFO_FILE} and {WEIGHTS_FILE}); pass the "
                                "--save folder of tools/train_adaptive_decoder.py")
        info = json.loads((d / INFO_FILE).read_text())
        head = cls(info["hidden_size"], info["temperatures"], info["mode"], info["head_hidden_size"])
        head.load_state_dict(torch.load(d / WEIGHTS_FILE, weights_only=True))
        return head
