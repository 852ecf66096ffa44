"""One configuration tree for a run: YAML files plus Megatron-LM style command-line flags.

    cfg = load_config(["--config", "examples/configs/tiny_llama.yaml", "--tensor-model-parallel-size", "2"])

Every field of every section is a flag. The flag is the field name with dashes, prefixed by the section's
flag prefix: `model.num_layers` -> `--num-layers`, `tempnet.lr` -> `--tempnet-lr`, `loss.dro_rho` ->
`--dro-rho`. Flags override the YAML file, which overrides the defaults below. Unknown YAML keys are an
error (with a suggestion), never silently ignored.

`validate_config(cfg, world_size, ...)` refuses impossible settings before any rank does work. What needs
more than the settings (the model family's sizes, Transformer Engine's FP8 recipes, a teacher checkpoint, the
tokenizer's vocabulary) is checked and resolved by finalize.py, which the trainer and the tools call.
This module imports no other module of the project but its table of fields, config_fields.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .config_fields import CHOICES, HELP, RANGES, describe_range, format_choices, out_of_range


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the problem and the fix."""


@dataclass
class ModelConfig:
    arch: str = "gpt"  # the model family: a name in models/registry.py
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # grouped-query attention (LLaMA); None = one group per head
    ffn_hidden_size: Optional[int] = None  # None: the family's default (models/<arch>/)
    seq_length: int = 64
    max_position_embeddings: Optional[int] = None  # None: seq_length
    vocab_size: Optional[int] = None  # true vocabulary size; None: the tokenizer's (required with --mock-data)
    make_vocab_size_divisible_by: int = 128  # padding independent of TP, so checkpoints reshard
    rotary_base: int = 10000
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    transformer_impl: str = "auto"  # "auto" (TE when a GPU and TE are present), "local", "transformer_engine"
    untie_embeddings_and_output_weights: Optional[bool] = None  # None: the family's default


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None  # model chunks per pipeline rank (interleaved 1F1B)
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False  # switched on for 16-bit training with TempNet (finalize.py)
    distributed_backend: str = "auto"  # "auto" (nccl on GPU, gloo on CPU), "nccl", "gloo"
    distributed_timeout_minutes: float = 10.0  # a collective that waits longer fails, naming the operation


@dataclass
class DataConfig:
    mock_data: bool = False  # synthetic tokens; no files needed
    data_path: list = field(default_factory=list)  # Megatron syntax: [w1, prefix1, w2, prefix2, ...] or [prefix, ...]
    split: str = "949,50,1"
    data_cache_path: Optional[str] = None
    data_cache_node_local: bool = False  # data_cache_path is node-local disk: each node builds its own caches
    tokenizer_model: Optional[str] = None  # sentencepiece .model (or a Hugging Face tokenizer folder)


@dataclass
class TrainConfig:
    mode: str = "scratch"  # "scratch", "finetune" (from --pretrained-checkpoint), "frozen_lm" (TempNet only)
    micro_batch_size: int = 2
    global_batch_size: int = 8
    train_iters: int = 100
    seed: int = 1234
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "fp32", "bf16", "fp16"
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_warmup_iters: int = 10
    lr_decay_iters: Optional[int] = None  # None: train_iters
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    eval_interval: int = 50
    eval_iters: int = 5
    eval_at_start: bool = False  # evaluate the untrained model first (a baseline for the curve)
    max_nonfinite_steps: int = 5  # abort after this many skipped (non-finite) steps in a row
    exit_duration_in_mins: Optional[float] = None  # save and exit (status 124: requeue) after this long
    exit_interval: Optional[int] = None  # save and exit (status 0) at a multiple of this iteration


@dataclass
class TempNetConfig:
    """TempNet head (docs/design.md): tau = tau_min + (tau_max - tau_min) * sigmoid(...), per token."""

    enabled: bool = False
    kind: str = "network"  # "network": TempNet; "global": one learned temperature for all tokens (ablation)
    hidden_size: int = 256  # d: TempNet's first layer maps the vocabulary to d
    tau_min: float = 0.5  # GPT-2 reference bounds [0.5, 5.0]; LLaMA [0.01, 2.0]
    tau_max: float = 5.0
    dropout: float = 0.0
    input_variant: str = "normalized"  # "normalized": z/||z||; "max_shifted": (z - max z)/||z - max z||
    scale_input: bool = False  # also feed log RMS(z) to the first layer: the per-token optimum scales with z
    tau_init: Optional[float] = 1.0  # every token's tau at initialisation (sets the last bias); None: the reference's
    lr: float = 3e-3  # TempNet's own peak learning rate; Adam moves tau by ~lr per step, so lr x steps >~ 1
    min_lr: float = 3e-4  # with lr_schedule "lm"
    lr_schedule: str = "constant"  # "constant" after the LM's warm-up (the LLaMA-2 reference); "lm": the LM's decay


@dataclass
class LossConfig:
    dro_rho: Optional[float] = None  # None: log V (cross-entropy at tau = 1), or log V - dro_target_entropy
    dro_target_entropy: Optional[float] = None  # nats: the entropy DRO aims softmax(z / tau) at, = log V - rho
    objective: str = "dro"  # "dro": tau CE(z/tau) + tau (rho - log V); "tau_ce": CE(z/tau) (ablation)
    loss_impl: str = "auto"  # "fused" (never materialises logits), "reference", or "auto" (whichever wins here)


@dataclass
class FP8Config:
    """FP8 matmuls in the transformer layers through Transformer Engine (megatron-core's TE layer spec).

    Master weights, optimizer state and gradients stay in fp32/bf16 (megatron-core's mixed-precision
    optimizer). TempNet and the loss stay in fp32: tau multiplies the loss and its gradient is a difference of
    two O(log V) terms (rho - KL), which neither bf16's 8-bit nor FP8's 3-bit mantissa resolves."""

    fp8_format: Optional[str] = None  # None (off), "e4m3", "hybrid" (e4m3 forward, e5m2 gradients)
    fp8_recipe: str = "delayed"  # "delayed", "tensorwise", "blockwise" (Hopper and later); "mxfp8" (Blackwell only)
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    keep_last: int = 2
    pretrained_checkpoint: Optional[str] = None  # model weights only (finetune / frozen_lm)
    verify_checkpoint: bool = True  # hash every file of a checkpoint before loading it (sizes are always checked)


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard_dir: Optional[str] = None
    tau_histogram_interval: int = 50


@dataclass
class AttentionTransferConfig:
    """Attention transfer (Li et al. 2024): train a student from a frozen teacher's attention maps
    (models/attention_transfer.py). The teacher is a checkpoint of ours with the same number of layers and
    attention heads; it runs at this run's TP/PP layout, in bf16 on a GPU and fp32 on a CPU."""

    mode: str = "none"  # "none"; "copy": use the teacher's attention probabilities; "distill": KL to them
    teacher_checkpoint: Optional[str] = None  # a save folder or iter_N folder written with --save
    distill_weight: float = 1.0  # objective = LM loss + weight x mean over layers, heads, tokens of KL(teacher || student)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tempnet: TempNetConfig = field(default_factory=TempNetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    attention_transfer: AttentionTransferConfig = field(default_factory=AttentionTransferConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Flag prefix per section: the Megatron-LM names are kept where they exist.
_FLAG_PREFIX = {"tempnet": "tempnet-", "attention_transfer": "attention-transfer-"}
_SECTIONS = [f.name for f in dataclasses.fields(Config)]


def _flag(section: str, name: str) -> str:
    return "--" + _FLAG_PREFIX.get(section, "") + name.replace("_", "-")


def _base_type(tp: Any) -> Any:
    """int for Optional[int], etc."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _section_types(section: str) -> dict[str, Any]:
    cls = type(getattr(Config(), section))
    return typing.get_type_hints(cls)


class _ConfigErrorParser(argparse.ArgumentParser):
    """argparse whose errors are ConfigErrors, reported like every other bad input: one line, not the usage text
    (which runs to a hundred lines here)."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{message} (see --help)")


def _flag_help(section: str, name: str, default: Any, choices: typing.Optional[typing.Sequence[str]]) -> str:
    key = f"{section}.{name}"
    text = HELP.get(key, "")
    if choices:
        text += f" (choices: {format_choices(choices)})"
    if key in RANGES:
        text += f" (must be {describe_range(RANGES[key])})"
    shown = "unset" if default is None or default == [] else default
    return f"{text} (default: {shown})".replace("%", "%%")


def build_parser(parents: typing.Sequence[argparse.ArgumentParser] = (), prog: str = "megatron_tempnet.train",
                 description: str = "Train GPT/LLaMA with a TempNet head on megatron-core. Flags override --config.",
                 choices: Mapping[str, typing.Sequence[str]] = {}) -> argparse.ArgumentParser:
    """The trainer's flags (every field of Config), after those of `parents` (a tool's own flags).
    `choices`: the values of fields whose choices another layer owns ("model.arch": the registered model
    families, finalize.build_parser), shown by --help beside those of config_fields.CHOICES."""
    parser = _ConfigErrorParser(
        prog=prog, parents=list(parents), usage="%(prog)s [--config FILE] [--dry-run] [FLAG VALUE ...]",
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file with sections: " + ", ".join(_SECTIONS) + " (default: none)")
    parser.add_argument("--dry-run", action="store_true", help="check the job's inputs (config, data, tokenizer, "
                        "checkpoint, disk) and exit (default: off)")
    defaults = Config()
    for section in _SECTIONS:
        group = parser.add_argument_group(section)
        for name, tp in _section_types(section).items():
            base = _base_type(tp)
            dest = f"{section}.{name}"
            default = getattr(getattr(defaults, section), name)
            allowed = CHOICES.get(dest) or choices.get(dest)
            kw = dict(dest=dest, default=None, help=_flag_help(section, name, default, allowed))
            if base is bool:
                group.add_argument(_flag(section, name), action=argparse.BooleanOptionalAction, **kw)
            elif base is list or typing.get_origin(base) is list:
                group.add_argument(_flag(section, name), nargs="+", metavar=name.upper(), **kw)
            else:
                # Choices are checked by validation, for flags and YAML keys alike (one message for both).
                metavar = "{" + ",".join(allowed) + "}" if allowed else name.upper()
                group.add_argument(_flag(section, name), type=base, metavar=metavar, **kw)
    return parser


def _coerce(section: str, name: str, value: Any) -> Any:
    tp = _base_type(_section_types(section)[name])
    if value is None or tp is list or typing.get_origin(tp) is list:
        return value
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        return float(value)
    if tp is not bool and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{section}.{name} must be {tp.__name__}, got {value!r}")
    return value


def _apply_yaml(cfg: Config, path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} not found; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections ({', '.join(_SECTIONS)})")
    for section, values in data.items():
        if section not in _SECTIONS:
            hint = difflib.get_close_matches(section, _SECTIONS, n=1)
            raise ConfigError(
                f"{path}: unknown section '{section}'"
                + (f" (did you mean '{hint[0]}'?)" if hint else f"; valid sections: {', '.join(_SECTIONS)}")
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section '{section}' must be a mapping")
        known = _section_types(section)
        for name, value in values.items():
            if name not in known:
                hint = difflib.get_close_matches(name, list(known), n=1)
                raise ConfigError(
                    f"{path}: unknown key '{section}.{name}'"
                    + (f" (did you mean '{section}.{hint[0]}'?)" if hint else f"; valid keys: {', '.join(known)}")
                )
            setattr(getattr(cfg, section), name, _coerce(section, name, value))


def load_config(argv: Optional[list[str]] = None, *, parser: Optional[argparse.ArgumentParser] = None
                ) -> tuple[Config, argparse.Namespace]:
    """Parse flags (and the YAML file they name) into a Config. Returns (config, parsed namespace).
    `parser`: one made by `build_parser` with a tool's own flags added (tools/check_job.py)."""
    args = (parser or build_parser()).parse_args(argv)
    cfg = Config()
    if args.config:
        _apply_yaml(cfg, args.config)
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            section, name = dest.split(".", 1)
            setattr(getattr(cfg, section), name, value)
    return cfg, args


def dro_rho(loss: LossConfig, vocab_size: int) -> float:
    """The DRO radius rho in nats: --dro-rho, else log V - --dro-target-entropy, else log V (which with tau = 1
    is plain cross-entropy)."""
    if loss.dro_rho is not None:
        return loss.dro_rho
    if loss.dro_target_entropy is not None:
        return math.log(vocab_size) - loss.dro_target_entropy
    return math.log(vocab_size)


def _validate_dro_target(cfg: Config) -> None:
    """TempNet trained with the DRO loss needs a target entropy it can reach (docs/design.md, "Per-token optimum")."""
    loss, tn = cfg.loss, cfg.tempnet
    if loss.dro_rho is not None and loss.dro_target_entropy is not None:
        raise ConfigError("pass --dro-rho or --dro-target-entropy, not both (the target entropy is log V - rho)")
    if not (tn.enabled and loss.objective == "dro"):
        return
    if loss.dro_rho is None and loss.dro_target_entropy is None:
        raise ConfigError(
            "TempNet with the DRO objective needs a target: without --dro-rho, rho = log V and the target entropy "
            "log V - rho is 0, which drives every tau to --tempnet-tau-min; pass --dro-target-entropy NATS "
            "(e.g. 2.0, the entropy DRO aims each tempered prediction at) or --dro-rho")
    if cfg.model.vocab_size is None:
        return  # checked again once the tokenizer gives the vocabulary
    log_v = math.log(cfg.model.vocab_size)
    target = log_v - dro_rho(loss, cfg.model.vocab_size)
    if not 0 < target < log_v:
        raise ConfigError(
            f"the DRO target entropy log V - rho = {target:.4g} nats must lie strictly between 0 and "
            f"log V = {log_v:.4g} for TempNet to have a per-token optimum (0 drives every tau to "
            f"--tempnet-tau-min); set --dro-target-entropy in (0, {log_v:.4g}) or --dro-rho in (0, {log_v:.4g})")


def data_parallel_size(cfg: Config, world_size: int) -> int:
    return world_size // (cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size)


def _check_field_values(cfg: Config) -> None:
    """Each field on its own: a string among its choices, a number finite and in its range
    (config_fields.CHOICES / RANGES). Runs first, so the combination checks below see sane numbers."""
    for section in _SECTIONS:
        for name, value in vars(getattr(cfg, section)).items():
            key, flag = f"{section}.{name}", _flag(section, name)
            if key in CHOICES and value is not None and value not in CHOICES[key]:
                raise ConfigError(f"{flag} must be one of {format_choices(CHOICES[key])}; got {value!r}")
            problem = out_of_range(value, RANGES.get(key))
            if problem:
                raise ConfigError(f"{flag} must be {problem}; got {value!r} (see --help for what it means)")


def _validate_data(d: DataConfig, vocab_size: Optional[int]) -> None:
    """Training data, its tokenizer and its index caches."""
    if d.mock_data and vocab_size is None:
        raise ConfigError("--mock-data needs --vocab-size (there is no tokenizer to take it from)")
    if not d.mock_data and not d.data_path:
        raise ConfigError("no training data: pass --data-path PREFIX [...] (see tools/preprocess_data.py) or --mock-data")
    if d.data_cache_node_local and not d.data_cache_path:
        raise ConfigError("--data-cache-node-local needs --data-cache-path: a folder on each node's own disk "
                          "(e.g. $SLURM_TMPDIR/idx-cache)")
    if d.data_path and not d.tokenizer_model:
        raise ConfigError("--data-path needs --tokenizer-model (the tokenizer the data was preprocessed with)")


def validate_config(cfg: Config, world_size: int, *, cuda_available: bool, te_available: bool) -> None:
    """Refuse impossible settings with a message that names the problem and the fix: the checks the settings
    allow on their own (finalize.validate adds those that need the model family, TE or a teacher checkpoint).

    Called on every rank before any collective, so a bad run fails in seconds, identically everywhere.
    """
    m, p, t, tn = cfg.model, cfg.parallel, cfg.train, cfg.tempnet
    tp, pp, vpp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    _check_field_values(cfg)
    decaying = [(t.min_lr, t.lr, "--")] + ([(tn.min_lr, tn.lr, "--tempnet-")] if tn.lr_schedule == "lm" else [])
    for low, high, prefix in decaying:
        if low > high:  # megatron-core's scheduler asserts it for the LM (and TempNet's lr would rise)
            raise ConfigError(f"{prefix}min-lr {low} exceeds {prefix}lr {high}, but the learning rate decays from "
                              f"{prefix}lr to {prefix}min-lr; pass a {prefix}min-lr of at most {high}")

    if world_size % (tp * pp) != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by TP x PP = {tp} x {pp}; "
            f"launch a multiple of {tp * pp} ranks or change the parallel sizes"
        )
    dp = data_parallel_size(cfg, world_size)
    if m.num_attention_heads % tp != 0:
        raise ConfigError(
            f"--num-attention-heads {m.num_attention_heads} is not divisible by "
            f"--tensor-model-parallel-size {tp}; choose a TP size that divides the head count"
        )
    groups = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % groups != 0:
        raise ConfigError(f"--num-query-groups {groups} must divide --num-attention-heads {m.num_attention_heads}")
    if groups % tp != 0:
        raise ConfigError(
            f"--num-query-groups {groups} is not divisible by --tensor-model-parallel-size {tp}; "
            "use a TP size that divides the number of key/value groups"
        )
    if m.hidden_size % m.num_attention_heads != 0:
        raise ConfigError(f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads {m.num_attention_heads}")
    stages = pp * (vpp or 1)
    if m.num_layers % stages != 0:
        what = f"PP x virtual stages = {pp} x {vpp}" if vpp else f"--pipeline-model-parallel-size {pp}"
        raise ConfigError(
            f"--num-layers {m.num_layers} is not divisible by {what}; "
            f"use a layer count that is a multiple of {stages}"
        )
    if vpp is not None and (pp < 2 or vpp < 2):
        raise ConfigError("--virtual-pipeline-model-parallel-size needs PP >= 2 and a value >= 2 (or leave it unset)")
    if t.global_batch_size % (t.micro_batch_size * dp) != 0:
        raise ConfigError(
            f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size {t.micro_batch_size} "
            f"x data-parallel size {dp}; use a global batch that is a multiple of {t.micro_batch_size * dp}"
        )
    if pp > 1 and vpp and (t.global_batch_size // (t.micro_batch_size * dp)) % pp != 0:
        raise ConfigError(
            f"the interleaved schedule needs the number of micro-batches "
            f"({t.global_batch_size // (t.micro_batch_size * dp)}) to be a multiple of PP {pp}; adjust --global-batch-size"
        )
    if m.max_position_embeddings is not None and m.seq_length > m.max_position_embeddings:
        raise ConfigError(f"--seq-length {m.seq_length} exceeds --max-position-embeddings {m.max_position_embeddings}")

    if m.transformer_impl == "transformer_engine" and not (cuda_available and te_available):
        raise ConfigError(
            "--transformer-impl transformer_engine needs a CUDA GPU with Transformer Engine installed; "
            "use --transformer-impl local (or auto)"
        )
    if p.sequence_parallel and not (cuda_available and te_available):
        raise ConfigError(
            "--sequence-parallel needs Transformer Engine (or apex) LayerNorm on a GPU; drop it on this machine"
        )
    if t.precision in ("bf16", "fp16") and not cuda_available:
        raise ConfigError(f"--precision {t.precision} is for GPUs; use --precision fp32 (or auto) on a CPU")

    if tn.enabled:
        if not 0 < tn.tau_min < tn.tau_max:
            raise ConfigError(f"TempNet needs 0 < --tempnet-tau-min < --tempnet-tau-max; got {tn.tau_min}, {tn.tau_max}")
        if tn.tau_init is not None and not tn.tau_min < tn.tau_init < tn.tau_max:
            raise ConfigError(
                f"--tempnet-tau-init {tn.tau_init} must lie strictly between --tempnet-tau-min {tn.tau_min} and "
                f"--tempnet-tau-max {tn.tau_max}")
    _validate_dro_target(cfg)
    if t.mode == "frozen_lm" and not tn.enabled:
        raise ConfigError("--mode frozen_lm trains TempNet only; enable it with --tempnet-enabled")
    if t.mode in ("finetune", "frozen_lm") and not cfg.checkpoint.pretrained_checkpoint and not cfg.checkpoint.load:
        raise ConfigError(
            f"--mode {t.mode} starts from a trained LM; pass --pretrained-checkpoint DIR (or --load DIR to resume)"
        )
    _validate_data(cfg.data, m.vocab_size)

    at = cfg.attention_transfer
    if at.mode != "none":
        if not at.teacher_checkpoint:
            raise ConfigError(
                f"--attention-transfer-mode {at.mode} needs a teacher: pass --attention-transfer-teacher-checkpoint DIR "
                "(a checkpoint written with --save, with the same --num-layers and --num-attention-heads)")
        if t.mode == "frozen_lm":
            raise ConfigError("--attention-transfer-mode trains the LM; it cannot be combined with --mode frozen_lm")
