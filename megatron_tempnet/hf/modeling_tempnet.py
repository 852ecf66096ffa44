"""Causal LMs whose `generate` samples with TempNet's per-token temperatures (self-contained: torch,
safetensors, transformers; tools/convert_to_hf.py copies it, configuration_tempnet.py and tempnet_processor.py
into the converted folder, and config.json's auto_map points at them).

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    torch.manual_seed(1)
    out = model.generate(ids, max_new_tokens=32, return_dict_in_generate=True)   # do_sample, top_k 0: the folder's
    out.sequences, out.taus                                                      # taus [rows, new tokens]
    pipeline("text-generation", model=folder, trust_remote_code=True)("def f(") # the same model and sampling

`TempNet<Base>` (TempNetGPT2LMHeadModel, TempNetLlamaForCausalLM, TempNetQwen2ForCausalLM, ...) is the
transformers causal LM `<Base>` of the folder's model_type plus `tempnet`, a TempNetHead whose weights are the
`tempnet.*` tensors of model.safetensors (kept in fp32 whatever dtype the model loads in). `generate` adds a
TempNetLogitsProcessor: each next-token distribution is softmax(z / tau / temperature) with tau TempNet's
temperature for that position, then top-k / top-p, then sampling, in the order and with the random draws of
`python -m megatron_tempnet.generate` (on CPU, `torch.manual_seed(seed)` before `generate` gives the tokens
of `--seed seed`; transformers' top-p keeps the same tokens as ours, summed from the other end of the sorted
list, so only a token within float rounding of the top-p boundary can differ). `generate(...,
use_tempnet=False)` samples the plain LM (tau = 1).

The temperatures: `out.taus` with return_dict_in_generate=True, and `model.last_tempnet_taus` after every call
(also after a pipeline's): [rows, new tokens] fp32, tau of the token each row sampled at each step, NaN after
a row's end-of-sequence token (generate pads finished rows). With beam search rows are beam slots, which
generate reorders, so there the taus do not follow the returned sequences.
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch
import transformers
from transformers import LogitsProcessorList
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .configuration_tempnet import PREFIX, tempnet_config_class
from .tempnet_processor import WEIGHT_PREFIX, TempNetFolderError, TempNetHead, TempNetLogitsProcessor, check_folder


class TempNetGenerationMixin:
    """TempNet on top of a transformers causal LM: the `tempnet` module, loading checks and `generate`."""

    _keep_in_fp32_modules_strict = ["tempnet"]

    def _attach_tempnet(self, config) -> None:
        tempnet = getattr(config, "tempnet", None)
        self.tempnet = TempNetHead(tempnet) if tempnet else None
        self.last_tempnet_taus: Optional[torch.Tensor] = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' from_pretrained, refusing a folder with only one of TempNet's config and weights."""
        where = str(pretrained_model_name_or_path)
        if os.path.isdir(where):
            check_folder(where)  # before any weight is read
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        missing = sorted(k for k in info["missing_keys"] if k.startswith(WEIGHT_PREFIX))
        unexpected = sorted(k for k in info["unexpected_keys"] if k.startswith(WEIGHT_PREFIX))
        if missing:
            raise TempNetFolderError(f"{where}: config.json has a 'tempnet' entry but the weights lack {missing[:3]}; "
                                     "convert the checkpoint again with tools/convert_to_hf.py")
        if unexpected:
            raise TempNetFolderError(f"{where}: the weights hold TempNet ({unexpected[:3]}) but config.json has no "
                                     "'tempnet' entry; convert the checkpoint again with tools/convert_to_hf.py")
        return (model, info) if want_info else model

    def generate(self, inputs: Optional[torch.Tensor] = None, generation_config=None, logits_processor=None,
                 use_tempnet: bool = True, **kwargs):
        """transformers' generate with TempNet's temperatures (see the module's docstring); use_tempnet=False:
        tau = 1. Adds `taus` [rows, new tokens] to a dict output; always sets self.last_tempnet_taus."""
        self.last_tempnet_taus = None
        if self.tempnet is None or not use_tempnet:
            return super().generate(inputs, generation_config=generation_config, logits_processor=logits_processor,
                                    **kwargs)
        proc = TempNetLogitsProcessor(self.tempnet)
        procs = LogitsProcessorList([*(logits_processor or []), proc])
        out = super().generate(inputs, generation_config=generation_config, logits_processor=procs, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        taus = torch.stack(proc.taus, dim=1) if proc.taus else torch.zeros(sequences.shape[0], 0)
        new = sequences[:, sequences.shape[1] - taus.shape[1]:].cpu()
        eos = self._eos_ids(generation_config, kwargs)
        if eos:  # positions after a row's end-of-sequence token were not sampled for that row
            ended = torch.isin(new, torch.tensor(eos)).long().cumsum(-1)
            after = torch.cat([torch.zeros_like(ended[:, :1]), ended[:, :-1]], dim=1) > 0
            taus = taus.masked_fill(after, float("nan"))
        self.last_tempnet_taus = taus
        if not isinstance(out, torch.Tensor):
            out["taus"] = taus
        return out

    def _eos_ids(self, generation_config, kwargs) -> List[int]:
        eos = kwargs.get("eos_token_id", getattr(generation_config or self.generation_config, "eos_token_id", None))
        if eos is None:
            return []
        if isinstance(eos, torch.Tensor):
            eos = eos.tolist()
        return [eos] if isinstance(eos, int) else [int(e) for e in eos]


_MADE: dict = {}  # class name -> class


def tempnet_model_class(model_type: str) -> type:
    """TempNet's causal-LM class for config.json's `model_type`, made on first use (the module docstring);
    KeyError: transformers has no causal LM of that type."""
    base_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    name = PREFIX + base_name
    if name not in _MADE:
        base = getattr(transformers, base_name)

        def __init__(self, config):
            base.__init__(self, config)
            self._attach_tempnet(config)

        cls = type(name, (TempNetGenerationMixin, base), {
            "__module__": __name__, "__init__": __init__, "config_class": tempnet_config_class(model_type),
            "__doc__": f"{base_name} whose generate applies TempNet's temperatures."})
        cls.register_for_auto_class("AutoModelForCausalLM")
        _MADE[name] = cls
    return _MADE[name]


def __getattr__(name: str) -> type:
    """TempNet<Base> by name, made on first use: how transformers finds the class config.json's auto_map names.
    (Several model types can share one class, e.g. LlamaForCausalLM: the class's own config says which.)"""
    base = getattr(transformers, name[len(PREFIX):], None) if name.startswith(PREFIX) else None
    if base is None or name[len(PREFIX):] not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return tempnet_model_class(base.config_class.model_type)
