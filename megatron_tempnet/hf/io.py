"""Convert whole checkpoints: ours -> a Hugging Face folder, and a Hugging Face folder -> ours.

Export runs in this process without torch.distributed: our checkpoint, saved at any TP/PP, is read as full
tensors (checkpoint/full_weights.py) and mapped by its family's adapter (models/<family>/hf_adapter.py). Import
builds our model at TP = PP = 1 on a 1-rank process group (megatron-core needs one to save a checkpoint);
callers need an `if __name__ == "__main__":` guard (dist_checkpointing re-imports the main module).

The Hugging Face folder holds: config.json, generation_config.json (sampling as
`python -m megatron_tempnet.generate` does by default: do_sample, top_k 0, top_p 1, temperature 1),
model.safetensors (fp32 unless a dtype is asked for); the tokenizer (tokenizer.json for transformers 5 and
the sentencepiece tokenizer.model) when the run had a sentencepiece --tokenizer-model; megatron_tempnet.json
(where it came from). With TempNet, the model is modeling_tempnet.py's (the family's transformers class whose
generate applies TempNet), written by transformers' save_pretrained for custom code: the .py files beside the weights, an
auto_map in config.json (loaded with trust_remote_code=True), config.json's "tempnet" entry, TempNet's
weights as the tempnet.* tensors of model.safetensors (fp32 at every --dtype), and a "tempnet" entry in
generation_config.json that says so.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint import full_model_state_dict
from .convert import (ConversionError, check_hf_config, from_hf_state_dict, hf_adapter, hf_config,
                      model_config_from_hf, tempnet_from_hf, tempnet_hf_config, tempnet_to_hf, to_hf_state_dict)
from .tempnet_processor import WEIGHT_PREFIX, TempNetFolderError, check_folder

SOURCE_FILE = "megatron_tempnet.json"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _special_ids(tokenizer_model: Optional[str]) -> dict:
    if not tokenizer_model:
        return {}
    from ..data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_model)
    ids = {}
    for name in ("bos", "eos", "pad"):
        try:
            value = getattr(tok, name)
        except Exception:  # a tokenizer without that token
            continue
        if value is not None and value >= 0:
            ids[name] = int(value)
    return ids


def _hf_model_class(hcfg, architecture: str):
    """The transformers class of a config from hf_config: modeling_tempnet's when it carries TempNet, else
    transformers' `architecture` (the family adapter's)."""
    if getattr(hcfg, "tempnet", None):
        from .modeling_tempnet import tempnet_model_class

        return tempnet_model_class(hcfg.model_type)
    import transformers

    return getattr(transformers, architecture)


def _generation_config(special: dict, tempnet: Optional[dict]):
    """Our generator's defaults (sampling, no top-k / top-p, temperature 1) and a record of TempNet."""
    from transformers import GenerationConfig

    record = None
    if tempnet:
        record = {"kind": tempnet["kind"], "tau_min": tempnet["tau_min"], "tau_max": tempnet["tau_max"],
                  "applied_by": "modeling_tempnet.py: load with trust_remote_code=True (without it, tau = 1)"}
    return GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, bos_token_id=special.get("bos"),
                            eos_token_id=special.get("eos"), pad_token_id=special.get("pad"),
                            **({"tempnet": record} if record else {}))


def export_to_hf(ckpt_path: str, out_dir: str, *, tokenizer_model: Optional[str] = None, dtype: str = "fp32",
                 overwrite: bool = False) -> Path:
    """Our checkpoint (a save folder or one iter_N folder, any TP/PP) -> a Hugging Face folder, in this process
    without torch.distributed: no megatron model is built."""
    from ..inference.model import inference_config
    from ..checkpoint import check_integrity, read_info, resolve_checkpoint

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"{out} exists and is not empty; pass an empty or new folder (or --overwrite)")
    if dtype not in _DTYPES:
        raise ConversionError(f"--dtype must be one of {', '.join(_DTYPES)}")
    ckpt = resolve_checkpoint(ckpt_path)
    info = read_info(ckpt)
    cfg = inference_config(info["config"])
    adapter = hf_adapter(cfg.model)
    tokenizer_model = tokenizer_model or cfg.data.tokenizer_model
    if tokenizer_model and not Path(tokenizer_model).exists():
        raise ConversionError(f"tokenizer {tokenizer_model} (from the checkpoint's config) does not exist; pass "
                              "--tokenizer-model with the tokenizer the model was trained with")
    special = _special_ids(tokenizer_model)
    tn_config = tempnet_hf_config(cfg) if cfg.tempnet.enabled else None
    hcfg = hf_config(cfg, special, tn_config)  # before any tensor is read: refuses what has no Hugging Face class
    check_integrity(ckpt, cfg)
    sd = full_model_state_dict(ckpt, cfg.model)
    tn_tensors = tempnet_to_hf(cfg, sd) if tn_config else {}
    hf_model = _hf_model_class(hcfg, adapter.architecture)(hcfg)
    try:
        weights = to_hf_state_dict(cfg, sd)
    except KeyError as err:
        raise ConversionError(f"{ckpt} has no tensor {err}, which the {adapter.label} its config describes has; pass "
                              "a complete checkpoint of ours") from None
    weights.update({WEIGHT_PREFIX + k: v for k, v in tn_tensors.items()})
    missing, unexpected = hf_model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not hcfg.tie_word_embeddings]
    if missing or unexpected:
        raise ConversionError(f"internal mapping error: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if dtype != "fp32":
        hf_model.to(_DTYPES[dtype])
    if tn_config:
        hf_model.tempnet.float()  # the temperatures are computed in fp32 at every dtype
    hf_model.generation_config = _generation_config(special, tn_config)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(str(out), safe_serialization=True)
    if tokenizer_model:
        _write_tokenizer(tokenizer_model, out, hcfg.max_position_embeddings)
    source = {"converted_from": str(ckpt), "iteration": info["iteration"], "config": cfg.to_dict(),
              "tempnet": bool(cfg.tempnet.enabled), "tokenizer": bool(tokenizer_model)}
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=1))
    return out


def _write_tokenizer(tokenizer_model: str, out: Path, model_max_length: int) -> None:
    """The tokenizer into the Hugging Face folder: a Hugging Face tokenizer folder's files as they are, or
    tokenizer.json (and the .model) built from a sentencepiece model."""
    if Path(tokenizer_model).is_dir():
        for name in os.listdir(tokenizer_model):
            if name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens")):
                shutil.copy(os.path.join(tokenizer_model, name), out / name)
    else:
        from .tokenizer import save_hf_tokenizer

        save_hf_tokenizer(tokenizer_model, out, model_max_length=model_max_length)


def load_hf_model(folder: str | os.PathLike):
    """(model, TempNetHead or None) of a Hugging Face folder, for generation, without running the folder's
    code: a TempNet folder through this package's modeling_tempnet, any other causal LM through
    AutoModelForCausalLM. A folder with half a TempNet is refused (GenerationError)."""
    from transformers import AutoModelForCausalLM

    from ..inference.generation import GenerationError

    try:
        tempnet, _ = check_folder(folder)
        if tempnet is None:
            return AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto"), None
        from .modeling_tempnet import tempnet_model_class

        model_type = json.loads((Path(folder) / "config.json").read_text()).get("model_type")
        try:
            model_class = tempnet_model_class(model_type)
        except KeyError:
            raise GenerationError(f"{folder}: TempNet on a {model_type!r} model, which transformers has no causal LM "
                                  "for; pass a folder tools/convert_to_hf.py wrote") from None
        model = model_class.from_pretrained(str(folder), dtype="auto")
    except TempNetFolderError as err:
        raise GenerationError(str(err)) from None
    return model, model.tempnet


def read_hf_config(hf_dir: str) -> dict:
    p = Path(hf_dir)
    if not (p / "config.json").is_file():
        raise ConversionError(f"{p} has no config.json: pass a Hugging Face model folder (save_pretrained output)")
    cfg = json.loads((p / "config.json").read_text())
    check_hf_config(cfg, str(p))
    return cfg


def _load_hf_weights(hf_dir: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        bins = sorted(hf_dir.glob("pytorch_model*.bin"))
        if not bins:
            raise ConversionError(f"{hf_dir} has no *.safetensors (or pytorch_model*.bin) weights")
        sd = {}
        for b in bins:
            sd.update(torch.load(b, map_location="cpu", weights_only=True))
        return sd
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def import_from_hf(hf_dir: str, out_dir: str, *, seed: int = 1234) -> Path:
    """A Hugging Face folder of a family with an adapter (LLaMA, GPT-2, Qwen2) -> a model-only checkpoint of ours
    (iteration 0) in `out_dir`, to start runs with --pretrained-checkpoint (finetune, or --mode frozen_lm with a
    new TempNet). A TempNet written by export_to_hf comes along."""
    from ..config import Config
    from ..models.registry import model_dims
    from ..inference.model import build_model, ensure_single_process_group
    from ..checkpoint import save_checkpoint

    src = Path(hf_dir)
    hcfg = read_hf_config(hf_dir)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"{out} exists and is not empty; pass an empty or new folder")
    cfg = Config()
    cfg.model = model_config_from_hf(hcfg, str(src))
    cfg.train.seed = seed
    cfg.data.mock_data = True
    tok_dir_files = [n for n in ("tokenizer.json", "tokenizer_config.json") if (src / n).is_file()]
    if tok_dir_files:
        cfg.data.tokenizer_model = str(src.resolve())
    try:
        tn_cfg, _ = check_folder(src)
    except TempNetFolderError as err:
        raise ConversionError(str(err)) from None
    hf_weights = _load_hf_weights(src)
    sd = from_hf_state_dict(cfg.model, hf_weights, bool(hcfg.get("tie_word_embeddings", False)))
    if tn_cfg:
        t = cfg.tempnet
        t.enabled, t.tau_min, t.tau_max = True, tn_cfg["tau_min"], tn_cfg["tau_max"]
        t.hidden_size, t.input_variant = tn_cfg.get("hidden_size", t.hidden_size), tn_cfg.get("input_variant", "normalized")
        for name, default in (("kind", "network"), ("scale_input", False)):  # (fields of newer configs)
            if hasattr(t, name):
                setattr(t, name, tn_cfg.get(name, default))
        tn_tensors = {k[len(WEIGHT_PREFIX):]: v for k, v in hf_weights.items() if k.startswith(WEIGHT_PREFIX)}
        sd.update(tempnet_from_hf(tn_cfg, tn_tensors, model_dims(cfg.model).padded_vocab_size))
    ensure_single_process_group(seed)
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ConversionError(f"{src}: weights do not fit the model its config.json describes (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    save_checkpoint(cfg, 0, 0, [model], None, None, save_dir=str(out), keep_last=0)
    return out
