"""TempNet's per-token temperatures in Hugging Face generation (self-contained: torch + transformers).

tools/convert_to_hf.py copies this file into the converted folder next to tempnet.safetensors and
tempnet_config.json. Use it from there, or as megatron_tempnet.hf.tempnet_processor:

    import sys; sys.path.insert(0, folder)
    from tempnet_processor import TempNetLogitsProcessor
    model = AutoModelForCausalLM.from_pretrained(folder)
    proc = TempNetLogitsProcessor.from_pretrained(folder)
    out = model.generate(ids, do_sample=True, top_k=50, logits_processor=LogitsProcessorList([proc]))

For every generated position the processor computes TempNet's tau from that position's next-token logits
z (over the true vocabulary) and returns z / tau, which sampling (temperature, top-k, top-p) then uses:
the same as `python -m megatron_tempnet.generate`. transformers applies custom processors after its own
non-sampling ones (repetition penalty, bad words, ...) and before temperature / top-k / top-p; leave
those others off so TempNet sees the raw logits it was trained on (it treats masked, non-finite logits
as 0). `record=True` keeps every tau in `proc.taus` (one [batch] tensor per generated token).

TempNet (Qiu et al. 2024), as trained by megatron-tempnet:
    x = z / ||z||   (input_variant "max_shifted": z - max z instead of z)
    h = W2 sigmoid(W1 x + b1) + b2 ;  w = softmax(h / exp(s))
    tau = tau_min + (tau_max - tau_min) * sigmoid(a . ((w - 1/d) * h) + c)
kind "global" is one learned temperature for every token: tau = tau_min + (tau_max - tau_min) sigmoid(theta).
"""
from __future__ import annotations

import json
import os
from typing import List

import torch
import torch.nn.functional as F

try:
    from transformers import LogitsProcessor
except ImportError:  # usable without transformers as a plain module
    LogitsProcessor = object

CONFIG_FILE = "tempnet_config.json"
WEIGHTS_FILE = "tempnet.safetensors"


class TempNetHead(torch.nn.Module):
    """TempNet on full-vocabulary logits (no tensor parallelism), eval mode."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        self.kind = config.get("kind", "network")
        self.tau_min, self.tau_max = float(config["tau_min"]), float(config["tau_max"])
        self.vocab_size = int(config["vocab_size"])
        if self.kind == "global":
            self.theta = torch.nn.Parameter(torch.zeros(()))
            return
        d = int(config["hidden_size"])
        self.hidden_size = d
        self.input_variant = config.get("input_variant", "normalized")
        self.w1 = torch.nn.Parameter(torch.zeros(d, self.vocab_size))
        self.b1 = torch.nn.Parameter(torch.zeros(d))
        self.proj = torch.nn.Linear(d, d)
        self.log_scale = torch.nn.Parameter(torch.zeros(()))
        self.last = torch.nn.Linear(d, 1)

    @torch.no_grad()
    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [..., V] (next-token logits over the true vocabulary) -> tau [...] (fp32)."""
        if self.kind == "global":
            tau = self.tau_min + (self.tau_max - self.tau_min) * torch.sigmoid(self.theta.float())
            return tau.to(logits.device).expand(logits.shape[:-1])
        z = logits.float()[..., : self.vocab_size]
        z = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
        if self.input_variant == "max_shifted":
            z = z - z.amax(-1, keepdim=True)
        w1z = z @ self.w1.float().t()
        sq_norm = (z * z).sum(-1)
        x = w1z / sq_norm.clamp_min(1e-24).sqrt().unsqueeze(-1) + self.b1.float()
        h = F.linear(torch.sigmoid(x), self.proj.weight.float(), self.proj.bias.float())
        w = F.softmax(h / self.log_scale.float().exp(), dim=-1)
        score = F.linear((w - 1.0 / self.hidden_size) * h, self.last.weight.float(), self.last.bias.float()).squeeze(-1)
        return self.tau_min + (self.tau_max - self.tau_min) * torch.sigmoid(score)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "TempNetHead":
        from safetensors.torch import load_file

        config_path = os.path.join(folder, CONFIG_FILE)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}: it was converted without a TempNet head")
        with open(config_path) as f:
            config = json.load(f)
        head = cls(config)
        head.load_state_dict(load_file(os.path.join(folder, WEIGHTS_FILE)), strict=True)
        return head.eval()


class TempNetLogitsProcessor(LogitsProcessor):
    """Divides each sequence's next-token logits by TempNet's temperature for that position."""

    def __init__(self, head: TempNetHead, record: bool = False):
        self.head = head.eval()
        self.record = record
        self.taus: List[torch.Tensor] = []

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, record: bool = False) -> "TempNetLogitsProcessor":
        return cls(TempNetHead.from_pretrained(folder), record=record)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.head.to(scores.device)
        tau = self.head(scores)
        if self.record:
            self.taus.append(tau.detach().cpu())
        return scores / tau.unsqueeze(-1).to(scores.dtype)
