"""What every configuration field means, which values it takes, and which numbers are meaningful.

One table per concern, keyed "section.field" (the dataclasses of config.py):
- HELP: the description `--help` shows (the flag's choices and default are added by the parser);
- CHOICES: the allowed values of a string field; the parser offers them and `config.validate_config` refuses others,
  so a flag and a YAML key are checked against the same list (the model families, --arch's values, are
  models/registry.py's: finalize.py adds them);
- RANGES: the interval a number must lie in. Every float is also required to be finite.

tests/test_bad_inputs.py checks that every field of the configuration has a description, so a new field
cannot reach `--help` undocumented.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional


HELP = {
    "model.arch": "model family, one folder of megatron_tempnet/models/ each (listed in models/registry.py)",
    "model.num_layers": "transformer layers",
    "model.hidden_size": "width of the residual stream",
    "model.num_attention_heads": "attention heads per layer",
    "model.num_query_groups": "key/value groups for grouped-query attention; unset: one group per head",
    "model.ffn_hidden_size": "width of the MLP; unset: the family's default (e.g. 4 x hidden for gpt, 8/3 x "
                             "hidden rounded up to 64 for llama)",
    "model.seq_length": "tokens per training sample",
    "model.max_position_embeddings": "positions the model supports; unset: --seq-length",
    "model.vocab_size": "true vocabulary size; unset: the tokenizer's (required with --mock-data)",
    "model.make_vocab_size_divisible_by": "pad the vocabulary to a multiple of this (independent of TP, so "
                                          "checkpoints reshard)",
    "model.rotary_base": "RoPE base (LLaMA)",
    "model.norm_epsilon": "epsilon of LayerNorm / RMSNorm",
    "model.init_method_std": "standard deviation of the initial weights",
    "model.hidden_dropout": "dropout probability after attention and MLP",
    "model.attention_dropout": "dropout probability on the attention weights",
    "model.transformer_impl": "layer implementation: auto = Transformer Engine when a GPU and TE are present, "
                              "else local (pure torch)",
    "model.untie_embeddings_and_output_weights": "give the output layer its own weight instead of the input "
                                                 "embedding's; unset: the family's default (e.g. gpt ties "
                                                 "them, llama does not)",
    "parallel.tensor_model_parallel_size": "tensor-parallel ranks (TP)",
    "parallel.pipeline_model_parallel_size": "pipeline stages (PP)",
    "parallel.virtual_pipeline_model_parallel_size": "model chunks per pipeline rank (interleaved 1F1B); unset: "
                                                     "one",
    "parallel.sequence_parallel": "sequence parallelism (needs Transformer Engine on a GPU)",
    "parallel.use_distributed_optimizer": "shard the optimizer state over data-parallel ranks (switched on for "
                                          "16-bit training with TempNet)",
    "parallel.distributed_backend": "torch.distributed backend: auto = nccl on GPUs, gloo on CPUs",
    "parallel.distributed_timeout_minutes": "a collective that waits longer than this fails, naming the operation",
    "data.mock_data": "train on synthetic, learnable tokens; no files needed",
    "data.data_path": "preprocessed datasets in Megatron's syntax: PREFIX [PREFIX ...] or W1 PREFIX1 W2 PREFIX2 "
                      "...; a preprocess_data manifest stands for its shards",
    "data.split": "train,valid,test weights over each dataset's documents",
    "data.data_cache_path": "folder for megatron-core's index caches; unset: beside the data",
    "data.data_cache_node_local": "the --data-cache-path is on each node's own disk (no shared file system): local "
                                  "rank 0 of every node builds its node's caches (data/datasets.py)",
    "data.tokenizer_model": "the tokenizer the data was made with: a sentencepiece .model or a Hugging Face "
                            "tokenizer folder",
    "train.mode": "scratch: train everything; finetune: start from --pretrained-checkpoint; frozen_lm: train "
                  "TempNet only",
    "train.micro_batch_size": "samples per micro-batch on each data-parallel rank",
    "train.global_batch_size": "samples per optimizer step (all data-parallel ranks and micro-batches together)",
    "train.train_iters": "optimizer steps to train",
    "train.seed": "random seed (initialisation, data order, dropout)",
    "train.precision": "auto = bf16 on GPUs, fp32 on CPUs",
    "train.lr": "peak learning rate of the LM",
    "train.min_lr": "learning rate at the end of the decay",
    "train.lr_warmup_iters": "steps of linear warm-up",
    "train.lr_decay_iters": "steps until the learning rate reaches --min-lr; unset: --train-iters",
    "train.lr_decay_style": "shape of the learning-rate decay",
    "train.weight_decay": "AdamW weight decay",
    "train.adam_beta1": "Adam beta1",
    "train.adam_beta2": "Adam beta2",
    "train.adam_eps": "Adam epsilon",
    "train.clip_grad": "clip the gradient norm to this; 0: no clipping",
    "train.eval_interval": "evaluate every this many steps; 0: only at the end",
    "train.eval_iters": "batches per evaluation",
    "train.eval_at_start": "evaluate the untrained model first (a baseline for the curve)",
    "train.max_nonfinite_steps": "stop after this many skipped (non-finite) steps in a row",
    "train.exit_duration_in_mins": "save and exit with status 124 (requeue) after this many minutes",
    "train.exit_interval": "save and exit with status 0 at a multiple of this iteration",
    "tempnet.enabled": "add the TempNet head (a temperature per token)",
    "tempnet.kind": "network: TempNet; global: one learned temperature for all tokens (ablation)",
    "tempnet.hidden_size": "d: TempNet's first layer maps the vocabulary to d",
    "tempnet.tau_min": "lowest temperature (GPT-2 reference 0.5, LLaMA 0.01)",
    "tempnet.tau_max": "highest temperature (GPT-2 reference 5.0, LLaMA 2.0)",
    "tempnet.dropout": "dropout probability inside TempNet",
    "tempnet.input_variant": "TempNet's input: normalized = z/||z||; max_shifted = (z - max z)/||z - max z||",
    "tempnet.scale_input": "also feed log RMS(z) to TempNet's first layer (the per-token optimum scales with z)",
    "tempnet.tau_init": "every token's tau at initialisation (sets the last bias); unset: the reference's "
                        "initialisation",
    "tempnet.lr": "TempNet's own peak learning rate; Adam moves tau by about lr per step, so lr x steps should be "
                  ">~ 1",
    "tempnet.min_lr": "TempNet's learning rate at the end of the decay (with --tempnet-lr-schedule lm)",
    "tempnet.lr_schedule": "constant: the LM's warm-up, then no decay; lm: the LM's decay down to --tempnet-min-lr",
    "loss.dro_rho": "DRO radius rho (nats); unset: log V - --dro-target-entropy, or log V (with tau = 1 plain "
                    "cross-entropy)",
    "loss.dro_target_entropy": "the entropy (nats) DRO aims each tempered prediction softmax(z / tau) at, = log V - "
                               "rho; TempNet with the DRO objective needs it (or --dro-rho)",
    "loss.objective": "dro: tau CE(z/tau) + tau (rho - log V); tau_ce: CE(z/tau) (ablation)",
    "loss.loss_impl": "fused: never materialises the logits; reference: plain torch; auto: whichever wins here",
    "fp8.fp8_format": "FP8 matmuls through Transformer Engine; unset: off. hybrid = e4m3 forward, e5m2 gradients",
    "fp8.fp8_recipe": "FP8 scaling recipe (mxfp8 needs Blackwell)",
    "fp8.fp8_amax_history_len": "steps of amax history (delayed scaling)",
    "fp8.fp8_amax_compute_algo": "how the scale is taken from the amax history",
    "checkpoint.save": "folder to save checkpoints into (created if missing)",
    "checkpoint.load": "resume from this save folder (its latest checkpoint) or one iter_N folder",
    "checkpoint.save_interval": "save every this many steps; unset or 0: only at the end",
    "checkpoint.keep_last": "keep only the newest this many checkpoints; 0: keep all",
    "checkpoint.pretrained_checkpoint": "start from these model weights only (finetune / frozen_lm)",
    "checkpoint.verify_checkpoint": "compare the sha256 of every file of a checkpoint with the one recorded at "
                                    "save before loading it (sizes are always checked); --no-verify-checkpoint "
                                    "skips the hashing",
    "logging.log_interval": "print a line of metrics every this many steps",
    "logging.tensorboard_dir": "write TensorBoard scalars and tau histograms here; unset: no TensorBoard",
    "logging.tau_histogram_interval": "log a histogram of the temperatures every this many steps",
    "attention_transfer.mode": "none; copy: use the teacher's attention probabilities; distill: KL to them",
    "attention_transfer.teacher_checkpoint": "the teacher: a save folder or iter_N folder written with --save",
    "attention_transfer.distill_weight": "objective = LM loss + this x mean KL(teacher || student) over layers, "
                                         "heads and tokens",
}

CHOICES = {
    "model.transformer_impl": ("auto", "local", "transformer_engine"),
    "parallel.distributed_backend": ("auto", "nccl", "gloo"),
    "train.mode": ("scratch", "finetune", "frozen_lm"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.lr_decay_style": ("cosine", "linear", "constant"),
    "tempnet.kind": ("network", "global"),
    "tempnet.input_variant": ("normalized", "max_shifted"),
    "tempnet.lr_schedule": ("constant", "lm"),
    "loss.objective": ("dro", "tau_ce"),
    "loss.loss_impl": ("auto", "reference", "fused"),
    "fp8.fp8_format": ("e4m3", "hybrid"),
    "fp8.fp8_recipe": ("delayed", "tensorwise", "blockwise", "mxfp8"),  # megatron-core's names (fp8_support.py)
    "fp8.fp8_amax_compute_algo": ("max", "most_recent"),
    "attention_transfer.mode": ("none", "copy", "distill"),
}

# (low, high, low_open, high_open): None = unbounded on that side. Sizes, counts and intervals that a run
# divides by or loops over are >= 1; those where 0 means "off" (named so in HELP) are >= 0.
POSITIVE = (1, None, False, False)
NON_NEGATIVE = (0, None, False, False)
ABOVE_ZERO = (0, None, True, False)
PROBABILITY = (0, 1, False, True)  # dropout, Adam betas: 1 would stop all signal / all averaging
RANGES = {
    **{f"model.{k}": POSITIVE for k in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                                        "ffn_hidden_size", "seq_length", "max_position_embeddings", "vocab_size",
                                        "make_vocab_size_divisible_by", "rotary_base")},
    "model.norm_epsilon": ABOVE_ZERO, "model.init_method_std": ABOVE_ZERO,
    "model.hidden_dropout": PROBABILITY, "model.attention_dropout": PROBABILITY,
    "parallel.tensor_model_parallel_size": POSITIVE, "parallel.pipeline_model_parallel_size": POSITIVE,
    "parallel.virtual_pipeline_model_parallel_size": POSITIVE, "parallel.distributed_timeout_minutes": ABOVE_ZERO,
    **{f"train.{k}": POSITIVE for k in ("micro_batch_size", "global_batch_size", "train_iters", "lr_decay_iters",
                                        "eval_iters", "max_nonfinite_steps", "exit_interval")},
    "train.seed": NON_NEGATIVE, "train.lr": NON_NEGATIVE, "train.min_lr": NON_NEGATIVE,
    "train.lr_warmup_iters": NON_NEGATIVE, "train.weight_decay": NON_NEGATIVE,
    "train.adam_beta1": PROBABILITY, "train.adam_beta2": PROBABILITY, "train.adam_eps": ABOVE_ZERO,
    "train.clip_grad": NON_NEGATIVE, "train.eval_interval": NON_NEGATIVE, "train.exit_duration_in_mins": ABOVE_ZERO,
    "tempnet.hidden_size": POSITIVE, "tempnet.tau_min": ABOVE_ZERO, "tempnet.tau_max": ABOVE_ZERO,
    "tempnet.dropout": PROBABILITY, "tempnet.lr": NON_NEGATIVE, "tempnet.min_lr": NON_NEGATIVE,
    "tempnet.tau_init": ABOVE_ZERO,  # (between the bounds: config.validate_config)
    "loss.dro_rho": NON_NEGATIVE,  # rho is a KL radius; its bound log V and dro_target_entropy's are config.validate_config's
    "fp8.fp8_amax_history_len": POSITIVE,
    "checkpoint.save_interval": NON_NEGATIVE, "checkpoint.keep_last": NON_NEGATIVE,
    "logging.log_interval": POSITIVE, "logging.tau_histogram_interval": POSITIVE,
    "attention_transfer.distill_weight": NON_NEGATIVE,
}


def describe_range(bounds: tuple) -> str:
    low, high, low_open, high_open = bounds
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return " and ".join(parts)


def out_of_range(value: Any, bounds: Optional[tuple]) -> Optional[str]:
    """None when `value` (an int or float; None = unset) is acceptable, else what it must be."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number" + (f" {describe_range(bounds)}" if bounds else "")
    if bounds is None:
        return None
    low, high, low_open, high_open = bounds
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    return describe_range(bounds) if too_low or too_high else None


def format_choices(choices: Iterable) -> str:
    return ", ".join(map(str, choices))
