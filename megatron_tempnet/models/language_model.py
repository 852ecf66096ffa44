"""GPT and LLaMA language models with a TempNet head, on megatron-core's GPTModel.

The transformer is megatron-core's, unchanged; only the post-processing differs. On the last pipeline
stage the final hidden states go through the output layer (vocabulary-parallel logits), TempNet predicts
a temperature per token from those logits, and the DRO loss (loss.py) turns both into a per-token loss.
Without TempNet, tau = 1 and the same loss is cross-entropy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from tempnet_kernels.dro_cce import vocab_parallel_logit_max
from megatron.core.transformer.transformer_config import TransformerConfig

from .. import platform
from ..config import Config, padded_vocab_size
from ..loss import default_rho, dro_loss, linear_dro_loss, resolve_loss_impl
from . import gpt, llama
from .specs import layer_spec, set_init_seed
from .tempnet import TempNet

ARCHS = {"gpt": gpt, "llama": llama}


@dataclass
class LMOutput:
    """What the last pipeline stage returns when labels are given.

    loss: [b, s] per-token DRO loss (fp32); tau: [b, s] temperatures, or None without TempNet;
    ce_at_tau1: [b, s] plain cross-entropy, computed in evaluation when TempNet is on (else None)."""

    loss: torch.Tensor
    tau: Optional[torch.Tensor]
    ce_at_tau1: Optional[torch.Tensor] = None


class TempNetGPTModel(GPTModel):
    """megatron-core GPTModel whose last stage returns the DRO loss with TempNet temperatures."""

    def __init__(self, cfg: Config, config: TransformerConfig, pre_process: bool, post_process: bool,
                 vp_stage: Optional[int] = None, use_transformer_engine: bool = False):
        m = cfg.model
        set_init_seed(cfg.train.seed)
        torch.manual_seed(cfg.train.seed)  # embedding (built first); each layer reseeds itself
        super().__init__(
            config=config,
            transformer_layer_spec=layer_spec(m.arch, use_transformer_engine),
            vocab_size=padded_vocab_size(m),
            max_sequence_length=m.max_position_embeddings or m.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            vp_stage=vp_stage,
            **ARCHS[m.arch].model_kwargs(m),
        )
        self.true_vocab_size = m.vocab_size
        self.rho = cfg.loss.dro_rho if cfg.loss.dro_rho is not None else default_rho(m.vocab_size)
        self.loss_impl = resolve_loss_impl(cfg.loss.loss_impl, padded_vocab_size(m),
                                           cfg.parallel.tensor_model_parallel_size, platform.use_cuda())
        self.tempnet = None
        if post_process and cfg.tempnet.enabled:
            self.tempnet = TempNet(cfg.tempnet, m.vocab_size, padded_vocab_size(m), cfg.train.seed)

    def _output_weight(self) -> Optional[torch.Tensor]:
        return self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None

    def logits_and_tau(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """hidden_states: [s, b, h] -> (vocab-parallel logits [s, b, V/TP], tau [s, b] or None)."""
        logits, _ = self.output_layer(hidden_states, weight=self._output_weight())
        tau = self.tempnet(logits) if self.tempnet is not None else None
        return logits, tau

    def _fused_loss(self, hidden_states: torch.Tensor, targets: torch.Tensor) -> LMOutput:
        """The loss without logits: logits-free TempNet input and the fused DRO kernel."""
        weight = self._output_weight()
        weight = self.output_layer.weight if weight is None else weight
        sp = self.config.sequence_parallel
        tau = None
        if self.tempnet is not None:
            full = (tensor_parallel.gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
                    if sp else hidden_states)
            logit_max = None
            if self.tempnet.input_variant == "max_shifted":
                logit_max = vocab_parallel_logit_max(
                    full, weight, self.true_vocab_size, vocab_start_index=self.tempnet.vocab_start,
                    tp_group=parallel_state.get_tensor_model_parallel_group())
            tau = self.tempnet.forward_from_hidden(full, weight, logit_max)
        loss = linear_dro_loss(hidden_states, weight, targets, tau, self.rho, self.true_vocab_size, sp)
        ce = None
        if tau is not None and not self.training:
            ce = linear_dro_loss(hidden_states, weight, targets, None, default_rho(self.true_vocab_size),
                                 self.true_vocab_size, sp)
        t = lambda x: x.transpose(0, 1) if x is not None else None  # noqa: E731  [s, b] -> [b, s]
        return LMOutput(loss=t(loss), tau=t(tau), ce_at_tau1=t(ce))

    def _postprocess(self, hidden_states, labels=None, **_unused):
        if not self.post_process:
            return hidden_states
        if labels is not None and self.loss_impl == "fused":
            return self._fused_loss(hidden_states, labels.transpose(0, 1).contiguous())
        logits, tau = self.logits_and_tau(hidden_states)
        if labels is None:  # generation: [b, s, V/TP] logits and [b, s] tau
            return logits.transpose(0, 1), (tau.transpose(0, 1) if tau is not None else None)
        targets = labels.transpose(0, 1).contiguous()
        loss = dro_loss(logits, targets, tau, self.rho, self.true_vocab_size)
        if tau is None:
            return LMOutput(loss=loss.transpose(0, 1), tau=None)
        ce = None
        if not self.training:  # evaluation reports perplexity both at tau = 1 and with TempNet's tau
            ce = dro_loss(logits, targets, None, default_rho(self.true_vocab_size), self.true_vocab_size).transpose(0, 1)
        return LMOutput(loss=loss.transpose(0, 1), tau=tau.transpose(0, 1), ce_at_tau1=ce)


def transformer_config(cfg: Config, *, use_cpu_initialization: bool, params_dtype: torch.dtype,
                       use_transformer_engine: bool) -> TransformerConfig:
    """megatron-core TransformerConfig for the run (architecture from models/gpt.py or models/llama.py)."""
    m, p = cfg.model, cfg.parallel
    fp8 = cfg.fp8
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        kv_channels=m.hidden_size // m.num_attention_heads,
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
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        deallocate_pipeline_outputs=True,
        **platform.pipeline_p2p_config(),
    )
    if use_transformer_engine and fp8.fp8_format is not None:
        kwargs.update(fp8=fp8.fp8_format, fp8_recipe=fp8.fp8_recipe,
                      fp8_amax_history_len=fp8.fp8_amax_history_len,
                      fp8_amax_compute_algo=fp8.fp8_amax_compute_algo)
    kwargs.update(ARCHS[m.arch].transformer_kwargs(m))
    return TransformerConfig(**kwargs)

