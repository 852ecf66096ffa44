"""GPT and LLaMA language models with a TempNet head, on megatron-core's GPTModel.

The transformer is megatron-core's, unchanged; only the post-processing differs. On the last pipeline
stage the final hidden states go through the output layer (vocabulary-parallel logits), TempNet predicts
a temperature per token from those logits, and the DRO loss (loss.py) turns both into a per-token loss.
Without TempNet, tau = 1 and the same loss is cross-entropy. With --loss-impl fused the logits are never
formed: TempNet reads the hidden states and the output weight, and the fused kernel computes the loss.

Ablation switches: `--tempnet-kind global` learns one temperature for all tokens instead of TempNet;
`--objective tau_ce` trains with CE(z / tau) instead of the DRO loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from tempnet_kernels.dro_cce import vocab_parallel_logit_max
from megatron.core.transformer.transformer_config import TransformerConfig

from .. import runtime
from ..config import Config, dro_rho
from ..loss import default_rho, dro_loss, linear_dro_loss, resolve_loss_impl
from . import linear
from . import tempnet_diagnostics as diag
from .registry import get_family
from .specs import layer_spec, set_init_seed
from .tempnet import GlobalTemperature, TempNet

# Tokens of each evaluation micro-batch whose tau* is computed (40 entropy passes over the vocabulary each).
DIAGNOSED_TOKENS = 512


@dataclass
class LMOutput:
    """What the last pipeline stage returns when labels are given.

    loss: [b, s] per-token training objective (fp32); tau: [b, s] temperatures, or None without TempNet;
    ce_tau: [b, s] cross-entropy of z / tau (detached); ce_at_tau1: [b, s] plain cross-entropy, computed in
    evaluation when there is a temperature (else None); diagnostics: see below."""

    loss: torch.Tensor
    tau: Optional[torch.Tensor]
    ce_tau: torch.Tensor
    ce_at_tau1: Optional[torch.Tensor] = None
    # evaluation with a temperature: per-token [b, s] "tau_opt" (the DRO optimum), "entropy" (of softmax z, nats)
    # and "logit_scale" (std of z over the vocabulary), nan at positions not diagnosed (tau_diagnostics)
    diagnostics: Optional[dict] = None


class TempNetGPTModel(GPTModel):
    """megatron-core GPTModel whose last stage returns the DRO loss with TempNet temperatures.
    `family` and `dims`: its model family and sizes (models/family.py), from cfg.model."""

    def __init__(self, cfg: Config, config: TransformerConfig, pre_process: bool, post_process: bool,
                 vp_stage: Optional[int] = None, use_transformer_engine: bool = False):
        m = cfg.model
        family = get_family(m.arch)
        dims = family.dims(m)
        set_init_seed(cfg.train.seed)
        torch.manual_seed(cfg.train.seed)  # embedding (built first); each layer reseeds itself
        super().__init__(
            config=config,
            transformer_layer_spec=layer_spec(family.normalization, use_transformer_engine,
                                              explicit_attention=cfg.attention_transfer.mode != "none"),
            vocab_size=dims.padded_vocab_size,
            max_sequence_length=dims.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            vp_stage=vp_stage,
            **family.model_kwargs(m, dims),
        )
        self.family, self.dims = family, dims
        self.true_vocab_size = m.vocab_size
        self.rho = dro_rho(cfg.loss, m.vocab_size)
        self.loss_impl = resolve_loss_impl(cfg.loss.loss_impl, dims.padded_vocab_size,
                                           cfg.parallel.tensor_model_parallel_size, runtime.use_cuda())
        self.objective = cfg.loss.objective
        self.tempnet = None
        if post_process and cfg.tempnet.enabled:
            if cfg.tempnet.kind == "global":
                self.tempnet = GlobalTemperature(cfg.tempnet)
            else:
                self.tempnet = TempNet(cfg.tempnet, m.vocab_size, dims.padded_vocab_size, cfg.train.seed)

    def _output_weight(self) -> Optional[torch.Tensor]:
        return self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None

    def logits_and_tau(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """hidden_states: [s, b, h] -> (vocab-parallel logits [s, b, V/TP], tau [s, b] or None)."""
        logits = linear.output_logits(self.output_layer, hidden_states, self._output_weight())
        tau = self.tempnet(logits) if self.tempnet is not None else None
        return logits, tau

    def _fused_loss_fn(self, hidden_states: torch.Tensor):
        """(loss function of (targets, tau, rho), tau) without logits: logits-free TempNet input and the
        fused DRO kernel."""
        weight = self._output_weight()
        weight = self.output_layer.weight if weight is None else weight
        sp = self.config.sequence_parallel
        tau = None
        if self.tempnet is not None:
            full = (tensor_parallel.gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
                    if sp else hidden_states)
            logit_max = None
            if getattr(self.tempnet, "input_variant", None) == "max_shifted":
                logit_max = vocab_parallel_logit_max(
                    full, weight, self.true_vocab_size, vocab_start_index=self.tempnet.vocab_start,
                    tp_group=parallel_state.get_tensor_model_parallel_group())
            tau = self.tempnet.forward_from_hidden(full, weight, logit_max)
        return partial(linear_dro_loss, hidden_states, weight, vocab_size=self.true_vocab_size, sequence_parallel=sp), tau

    def _postprocess(self, hidden_states, labels=None, **_unused):
        if not self.post_process:
            return hidden_states
        if labels is None:  # generation: [b, s, V/TP] logits and [b, s] tau
            logits, tau = self.logits_and_tau(hidden_states)
            return logits.transpose(0, 1), (tau.transpose(0, 1) if tau is not None else None)
        targets = labels.transpose(0, 1).contiguous()
        if self.loss_impl == "fused":
            loss_fn, tau = self._fused_loss_fn(hidden_states)
        else:
            logits, tau = self.logits_and_tau(hidden_states)
            loss_fn = partial(dro_loss, logits, vocab_size=self.true_vocab_size)
        log_v = default_rho(self.true_vocab_size)
        if tau is None:
            loss = loss_fn(targets, None, rho=self.rho)
            ce_tau = loss.detach() - (self.rho - log_v)
        elif self.objective == "tau_ce":  # CE(z / tau): the temperature without the DRO term
            loss = loss_fn(targets, tau, rho=log_v) / tau
            ce_tau = loss.detach()
        else:  # DRO: tau * CE(z / tau) + tau * (rho - log V)
            loss = loss_fn(targets, tau, rho=self.rho)
            ce_tau = loss.detach() / tau.detach() - (self.rho - log_v)
        ce = diagnostics = None
        if tau is not None and not self.training:  # evaluation reports perplexity at tau = 1 too
            # first: at TP > 1 megatron-core's cross-entropy at tau = 1 overwrites the logits it is given
            diagnostics = self.tau_diagnostics(hidden_states, None if self.loss_impl == "fused" else logits)
            ce = loss_fn(targets, None, rho=log_v)
        t = lambda x: x.transpose(0, 1) if x is not None else None  # noqa: E731  [s, b] -> [b, s]
        return LMOutput(loss=t(loss), tau=t(tau), ce_tau=t(ce_tau), ce_at_tau1=t(ce),
                        diagnostics={k: t(v) for k, v in diagnostics.items()} if diagnostics else None)

    @torch.no_grad()
    def tau_diagnostics(self, hidden_states: torch.Tensor, logits: Optional[torch.Tensor] = None) -> dict:
        """Per-token tau*, entropy of softmax(z) and logit scale (models/tempnet_diagnostics.py) for at most
        DIAGNOSED_TOKENS evenly spaced tokens of the micro-batch; [s, b] each, nan elsewhere.

        hidden_states: [s, b, D] ([s/TP, b, D] under sequence parallelism); logits: [s, b, V/TP] when the loss
        materialised them, else they are formed here for the diagnosed tokens only."""
        tn, group = self.tempnet, parallel_state.get_tensor_model_parallel_group()
        if logits is None:
            full = (tensor_parallel.gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
                    if self.config.sequence_parallel else hidden_states)
            s, b = full.shape[:2]
        else:
            s, b = logits.shape[:2]
        n = s * b
        picked = torch.arange(0, n, max(1, -(-n // DIAGNOSED_TOKENS)), device=hidden_states.device)
        if logits is None:
            weight = self._output_weight()
            weight = self.output_layer.weight if weight is None else weight
            z = torch.nn.functional.linear(full.reshape(n, -1)[picked], weight)
        else:
            z = logits.reshape(n, -1)[picked]
        start = parallel_state.get_tensor_model_parallel_rank() * z.size(-1)
        v = self.true_vocab_size
        values = {"entropy": diag.tempered_entropy(z, torch.ones(z.size(0), device=z.device), v, start, group),
                  "logit_scale": diag.logit_scale(z, v, start, group)}
        target = math.log(v) - self.rho
        if self.objective == "dro" and target > 0:
            values["tau_opt"] = diag.optimal_tau(z, target, tn.tau_min, tn.tau_max, v, start, group)
        out = {}
        for key, value in values.items():
            full_values = torch.full((n,), float("nan"), device=z.device)
            full_values[picked] = value.float()
            out[key] = full_values.view(s, b)
        return out


def transformer_config(cfg: Config, *, use_cpu_initialization: bool, params_dtype: torch.dtype,
                       use_transformer_engine: bool) -> TransformerConfig:
    """megatron-core TransformerConfig for the run (the block's architecture from its model family)."""
    m, p = cfg.model, cfg.parallel
    fp8 = cfg.fp8
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        layernorm_epsilon=m.norm_epsilon,
        init_method_std=m.init_method_std,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        use_cpu_initialization=use_cpu_initialization,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        calculate_per_token_loss=True,  # the loss is the mean over all tokens of the global batch
        # megatron-core's jit-fused bias + activation / bias + dropout kernels on GPUs; plain ops on a CPU.
        bias_activation_fusion=runtime.use_cuda(),
        bias_dropout_fusion=runtime.use_cuda(),
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        deallocate_pipeline_outputs=True,
        cuda_graph_scope=[],  # the whole layer; megatron-core 0.16's default "full" means the same but warns
        **runtime.pipeline_p2p_config(),
    )
    if use_transformer_engine and fp8.fp8_format is not None:
        kwargs.update(fp8=fp8.fp8_format, fp8_recipe=fp8.fp8_recipe,
                      fp8_amax_history_len=fp8.fp8_amax_history_len,
                      fp8_amax_compute_algo=fp8.fp8_amax_compute_algo)
    family = get_family(m.arch)
    kwargs.update(family.transformer_kwargs(family.dims(m)))
    return TransformerConfig(**kwargs)

