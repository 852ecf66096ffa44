"""TempNet's per-token temperatures in Hugging Face generation (self-contained: torch, safetensors, transformers).

tools/convert_to_hf.py copies this file into the converted folder, where modeling_tempnet.py (the model that
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` returns) uses it. In a folder, TempNet
is its config, the `"tempnet"` entry of config.json, and its weights, the `tempnet.*` tensors of
model.safetensors; a folder with one half and not the other is refused (TempNetFolderError).

For every generated position TempNetLogitsProcessor computes TempNet's tau from that position's next-token
logits z (over the true vocabulary) and returns z / tau, which sampling (temperature, top-k, top-p) then uses:
the same as `python -m megatron_tempnet.generate`. transformers applies custom processors after its own
non-sampling ones (repetition penalty, bad words, ...) and before temperature / top-k / top-p; leave those
others off so TempNet sees the raw logits it was trained on (it treats masked, non-finite logits as 0).

TempNet (Qiu et al. 2024), as trained by megatron-tempnet:
    x = z / ||z||   (input_variant "max_shifted": z - max z instead of z)
    h = W2 sigmoid(W1 x + b1 [+ u log RMS(z)]) + b2 ;  w = softmax(h / exp(s))   (u: with scale_input)
    tau = tau_min + (tau_max - tau_min) * sigmoid(a . ((w - 1/d) * h) + c)
kind "global" is one learned temperature for every token: tau = tau_min + (tau_max - tau_min) sigmoid(theta).
"""
from __future__ import annotations

import glob
import json
import os
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

try:
    from transformers import LogitsProcessor
except ImportError:  # TempNetHead stays usable without transformers
    LogitsProcessor = object

CONFIG_KEY = "tempnet"  # config.json entry
WEIGHT_PREFIX = "tempnet."  # model.safetensors tensor names
OLD_FILES = ("tempnet_config.json", "tempnet.safetensors")  # where earlier converters put TempNet


class TempNetFolderError(ValueError):
    """A model folder whose TempNet is incomplete. The message names the problem and the fix."""


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
        self.scale_weight = torch.nn.Parameter(torch.zeros(d)) if config.get("scale_input") else None  # u
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
        sq_norm = (z * z).sum(-1).clamp_min(1e-24)
        x = w1z / sq_norm.sqrt().unsqueeze(-1) + self.b1.float()
        if self.scale_weight is not None:  # + u log RMS(z), RMS over the true vocabulary
            x = x + 0.5 * (sq_norm / self.vocab_size).log().unsqueeze(-1) * self.scale_weight.float()
        h = F.linear(torch.sigmoid(x), self.proj.weight.float(), self.proj.bias.float())
        w = F.softmax(h / self.log_scale.float().exp(), dim=-1)
        score = F.linear((w - 1.0 / self.hidden_size) * h, self.last.weight.float(), self.last.bias.float()).squeeze(-1)
        return self.tau_min + (self.tau_max - self.tau_min) * torch.sigmoid(score)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> Optional["TempNetHead"]:
        """TempNet of a Hugging Face folder written by tools/convert_to_hf.py; None when it has none."""
        from safetensors import safe_open

        config, files = check_folder(folder)
        if config is None:
            return None
        tensors = {}
        for path in files:
            with safe_open(path, framework="pt") as f:
                tensors.update({k[len(WEIGHT_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(WEIGHT_PREFIX)})
        head = cls(config)
        head.load_state_dict(tensors, strict=True)
        return head.float().eval()


def folder_parts(folder: str | os.PathLike) -> Tuple[Optional[dict], List[str], List[str]]:
    """(config.json's TempNet entry or None, the safetensors files holding TempNet weights, their names)."""
    from safetensors import safe_open

    config_path = os.path.join(folder, "config.json")
    config = None
    if os.path.isfile(config_path):  # (without one, transformers says what is missing)
        with open(config_path) as f:
            config = json.load(f).get(CONFIG_KEY)
    files, names = [], []
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            found = [k for k in f.keys() if k.startswith(WEIGHT_PREFIX)]
        if found:
            files.append(path)
            names += found
    return config, files, names


def check_folder(folder: str | os.PathLike) -> Tuple[Optional[dict], List[str]]:
    """(TempNet's config or None, the files with its weights); TempNetFolderError when the folder holds only
    one of TempNet's config and weights, or TempNet in the files of an earlier converter."""
    config, files, _ = folder_parts(folder)
    if config is not None and not files:
        raise TempNetFolderError(
            f"{folder}: config.json has a '{CONFIG_KEY}' entry but no *.safetensors holds TempNet's weights "
            f"({WEIGHT_PREFIX}*); convert the checkpoint again with tools/convert_to_hf.py (or delete the entry to use "
            "the plain model)")
    if config is None and files:
        raise TempNetFolderError(
            f"{folder}: {os.path.basename(files[0])} holds TempNet's weights ({WEIGHT_PREFIX}*) but config.json has no "
            f"'{CONFIG_KEY}' entry; convert the checkpoint again with tools/convert_to_hf.py")
    old = [n for n in OLD_FILES if os.path.exists(os.path.join(folder, n))]
    if config is None and old:
        raise TempNetFolderError(
            f"{folder} holds TempNet as {' and '.join(old)}, which this version does not read; convert the checkpoint "
            "again with tools/convert_to_hf.py")
    return config, files


class TempNetLogitsProcessor(LogitsProcessor):
    """Divides each sequence's next-token logits by TempNet's temperature for that position and keeps every
    tau in `taus` (one [batch] tensor per generated token)."""

    def __init__(self, head: TempNetHead):
        self.head = head.eval()
        self.taus: List[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.head.to(scores.device)
        tau = self.head(scores)
        self.taus.append(tau.detach().float().cpu())
        return scores / tau.unsqueeze(-1).to(scores.dtype)
