"""Attention transfer, training side: the frozen teacher, and how its attention reaches the student.

The model side (ExplicitAttention, the KL term, the modes) is in models/explicit_attention.py.

The teacher is a frozen copy of the model family read from a checkpoint of ours: built by the same provider
(TempNetGPTModel, megatron-core's spec) at this run's TP/PP/VPP layout, from the checkpoint's own model
flags (so it may be wider or use the other architecture), with no TempNet, no output layer and no final
norm (only its attention maps are used), in eval mode, without gradients, in the lowest precision the device
runs well (bf16 on a GPU, fp32 on a CPU). It must have the student's number of layers and attention heads
and the student's vocabulary. Teacher layer l and student layer l live on the same rank and hold the same
heads (TP splits both the same way), so the probabilities never leave the rank.

It runs as a step extension (training/extensions.py): `AttentionTransfer.from_config` builds it once per run
(training/loop.py), and the training step calls its hooks:
  - PP = 1: `before_forward` runs the teacher on the micro-batch, then hands each student layer the
    teacher's probabilities of its layer; memory: one micro-batch of teacher maps.
  - PP > 1: a stage's teacher layers need the teacher's hidden states from the previous stage, so before
    each student schedule `before_schedule` runs the teacher through megatron-core's forward-only
    schedule over the same micro-batches (the student then replays them), and every stage queues its
    teacher layers' maps per model chunk; `before_forward` takes them in micro-batch order. Memory: the
    maps of all micro-batches of a global batch for this rank's layers and heads, until used.
  - `metrics` reduces the distillation KL over all ranks: metrics["attn_kl"], the mean over
    layers, heads and loss-masked tokens of KL(teacher || student) (unweighted).
The distillation term itself is backpropagated inside the student's layers (models/explicit_attention.py).

`check_teacher` holds the teacher checks that need no process group, for a run's checks before any work.

Not supported: context parallelism, activation recomputation of the core attention (the maps are taken
once per forward), packed sequences.
"""
from __future__ import annotations

import collections
import copy
from pathlib import Path
from typing import Deque, Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from .. import runtime
from ..config import Config, ConfigError, ModelConfig
from ..models.explicit_attention import ExplicitAttention, TransferContext
from ..models.build import params_dtype, unwrap, use_transformer_engine
from ..models.registry import get_family
from .extensions import StepExtension


class AttentionTransferError(ConfigError):
    """A teacher that cannot be used for this student. The message names the problem and the fix."""


_FLAG = "--attention-transfer-teacher-checkpoint"


def teacher_checkpoint(cfg: Config) -> Path:
    """The teacher's iteration folder, or a clear error."""
    from ..checkpoint import CheckpointError, resolve_checkpoint

    path = cfg.attention_transfer.teacher_checkpoint
    if not path:
        raise AttentionTransferError(f"attention transfer needs a teacher: pass {_FLAG} DIR")
    if not Path(path).exists():
        raise AttentionTransferError(
            f"teacher checkpoint {path} does not exist; pass {_FLAG} a folder written with --save (a trained model "
            f"with --num-layers {cfg.model.num_layers} and --num-attention-heads {cfg.model.num_attention_heads})")
    try:
        return resolve_checkpoint(path)
    except CheckpointError as err:
        raise AttentionTransferError(f"teacher checkpoint ({_FLAG}): {err}") from None


def teacher_config(cfg: Config) -> Config:
    """This run's configuration with the teacher's model: the checkpoint's model flags, this run's sequence
    length, layout and seed; no TempNet, no dropout, precision "auto". Refuses a teacher that cannot teach
    this student (layers, heads, vocabulary, positions, TP/PP split), naming the difference and the fix."""
    from ..checkpoint import check_layout_fits, read_info

    ckpt = teacher_checkpoint(cfg)
    saved = read_info(ckpt)["config"]["model"]
    tm = ModelConfig(**{k: v for k, v in saved.items() if k in ModelConfig.__dataclass_fields__})
    m = cfg.model
    problems = []
    if tm.num_layers != m.num_layers:
        problems.append(f"it has {tm.num_layers} layers, the student {m.num_layers} (--num-layers)")
    if tm.num_attention_heads != m.num_attention_heads:
        problems.append(f"it has {tm.num_attention_heads} attention heads, the student {m.num_attention_heads} "
                        "(--num-attention-heads)")
    if tm.vocab_size != m.vocab_size:
        problems.append(f"its vocabulary has {tm.vocab_size} tokens, the student's {m.vocab_size}: they must use the "
                        "same tokenizer")
    teacher_positions = tm.max_position_embeddings or tm.seq_length
    if get_family(tm.arch).learned_positions and teacher_positions < m.seq_length:
        problems.append(f"its learned position embeddings cover {teacher_positions} tokens, fewer than --seq-length "
                        f"{m.seq_length}")
    if problems:
        raise AttentionTransferError(
            f"teacher checkpoint {ckpt} cannot teach this student: {'; '.join(problems)}. The teacher's attention "
            f"maps go layer by layer and head by head to the student: train the student with the teacher's layer and "
            f"head counts and tokenizer (see {ckpt / 'tempnet_checkpoint.json'}), or pass another teacher to {_FLAG}")
    p = cfg.parallel
    try:
        check_layout_fits(saved, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                          p.virtual_pipeline_model_parallel_size)
    except ConfigError as err:
        raise AttentionTransferError(f"teacher checkpoint {ckpt}: {err}") from None
    tcfg = copy.deepcopy(cfg)
    tm.seq_length = m.seq_length
    tm.max_position_embeddings = teacher_positions
    tm.hidden_dropout = tm.attention_dropout = 0.0
    tm.transformer_impl = m.transformer_impl
    tcfg.model = tm
    tcfg.tempnet.enabled = False
    tcfg.train.precision = "auto"  # bf16 on a GPU, fp32 on a CPU
    tcfg.fp8.fp8_format = None
    tcfg.checkpoint.load = tcfg.checkpoint.pretrained_checkpoint = None
    return tcfg


def check_teacher(cfg: Config) -> None:
    """The teacher checks that need no process group (for a job's preflight)."""
    if cfg.attention_transfer.mode != "none":
        teacher_config(cfg)


def _contexts(chunk: torch.nn.Module, ctx: TransferContext) -> int:
    n = 0
    for module in chunk.modules():
        if isinstance(module, ExplicitAttention):
            module.context = ctx
            n += 1
    return n


def _teacher_model_class():
    from ..models.language_model import TempNetGPTModel

    class TeacherGPTModel(TempNetGPTModel):
        """The teacher: no output layer (built with post_process=False) and weights from a checkpoint, so
        there is no initial embedding/output tie to set up, and no collective over the embedding group
        (which the teacher's last stage, without an output layer, would not join)."""

        def setup_embeddings_and_output_layer(self) -> None:
            pass

    return TeacherGPTModel


def load_teacher_weights(ckpt: Path, chunks: List[torch.nn.Module]) -> None:
    """Load the teacher chunks' weights (any saved layout) from `ckpt`.

    Like checkpointing.load_model_weights, but only the tensors are read: the linear layers' `_extra_state`
    objects (FP8 metadata in Transformer Engine layers, empty in local ones) are not stored as tensors and
    the frozen, non-FP8 teacher does not use them."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    from ..checkpoint import (check_integrity, checkpoint_tensor_shapes, model_sharded_state_dict, safe_dist_load,
                                sharded_state_dict_metadata)

    check_integrity(ckpt, None)
    shapes = checkpoint_tensor_shapes(ckpt)
    metadata = sharded_state_dict_metadata()
    sd = {}
    for i, chunk in enumerate(chunks):
        chunk_sd = model_sharded_state_dict(chunk, metadata)
        for key in list(chunk_sd):
            sh = chunk_sd[key]
            if isinstance(sh, ShardedObject):
                del chunk_sd[key]
            elif isinstance(sh, ShardedTensor) and shapes.get(sh.key) != tuple(sh.global_shape):
                found = f"shape {shapes[sh.key]}" if sh.key in shapes else "no such tensor"
                raise AttentionTransferError(
                    f"teacher checkpoint {ckpt}: {sh.key} should have shape {tuple(sh.global_shape)}, found {found}; "
                    f"the checkpoint does not match its own configuration file; pass another teacher to {_FLAG}")
        sd[f"model{i}"] = chunk_sd
    loaded = safe_dist_load(sd, ckpt)
    for i, chunk in enumerate(chunks):
        missing, _ = chunk.load_state_dict(loaded[f"model{i}"], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing:
            raise AttentionTransferError(f"teacher checkpoint {ckpt} lacks weights {missing[:5]}; pass another teacher "
                                         f"to {_FLAG}")


def build_teacher(cfg: Config) -> List[torch.nn.Module]:
    """The frozen teacher's chunks for this rank, weights loaded from the teacher checkpoint."""
    from ..models.language_model import transformer_config

    tcfg = teacher_config(cfg)
    te = use_transformer_engine(tcfg)
    tconf = transformer_config(tcfg, use_cpu_initialization=not runtime.use_cuda(), params_dtype=params_dtype(tcfg),
                               use_transformer_engine=te)
    tconf.perform_initialization = False  # every weight comes from the checkpoint
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    chunks = []
    # The teacher's construction reseeds the CPU generator (layout-independent init): keep the student's streams.
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if runtime.use_cuda() else []):
        for vp_stage in range(vpp or 1):
            stage = vp_stage if vpp else None
            chunk = _teacher_model_class()(
                tcfg, tconf, pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=False, vp_stage=stage, use_transformer_engine=te)
            chunks.append(chunk.to(runtime.device()))
    load_teacher_weights(teacher_checkpoint(cfg), chunks)
    for chunk in chunks:
        chunk.requires_grad_(False)
        chunk.eval()
    return chunks


def _no_loss(output: torch.Tensor):
    return torch.zeros((), device=output.device), torch.ones((), dtype=torch.int), {}


def _index(chunks: List[torch.nn.Module], chunk: torch.nn.Module) -> int:
    for i, c in enumerate(chunks):
        if c is chunk:
            return i
    raise RuntimeError("attention transfer: unknown model chunk")


class AttentionTransfer(StepExtension):
    """The step extension (training/extensions.py): this rank's frozen teacher chunks, and the per-chunk
    contexts that connect them to the student's explicit-attention layers."""

    def __init__(self, cfg: Config, model: List[torch.nn.Module], teacher: List[torch.nn.Module]):
        """Connect the student chunks `model` (DDP-wrapped or not) to the teacher chunks `teacher`."""
        at, m = cfg.attention_transfer, cfg.model
        common = dict(num_layers=m.num_layers, num_heads=m.num_attention_heads, distill_weight=at.distill_weight)
        self.cfg, self.mode = cfg, at.mode
        self.student = [unwrap(c) for c in model]
        self.teacher = teacher
        self.student_contexts = [TransferContext(role=at.mode, **common) for _ in self.student]
        self.teacher_contexts = [TransferContext(role="teacher", record_dtype=next(t.parameters()).dtype, **common)
                                 for t in teacher]
        # PP > 1: per student chunk, the teacher's maps of each micro-batch of the schedule, in order
        self.queues: List[Deque[Dict[int, torch.Tensor]]] = [collections.deque() for _ in self.student]
        for s, t, sctx, tctx in zip(self.student, teacher, self.student_contexts, self.teacher_contexts):
            n_s, n_t = _contexts(s, sctx), _contexts(t, tctx)
            if n_s != n_t or n_s == 0:
                raise RuntimeError(f"attention transfer: the student chunk has {n_s} explicit-attention layers and "
                                   f"the teacher chunk {n_t}; both must be built with --attention-transfer-mode "
                                   "copy|distill")

    @classmethod
    def from_config(cls, cfg: Config, model: List[torch.nn.Module]) -> Optional["AttentionTransfer"]:
        """Build the teacher for the student chunks `model` and connect them; None with
        --attention-transfer-mode none. Called on every rank after the process groups exist."""
        if cfg.attention_transfer.mode == "none":
            return None
        return cls(cfg, model, build_teacher(cfg))

    def run_teacher(self, i: int, batch) -> Dict[int, torch.Tensor]:
        """The attention maps of teacher chunk i on `batch` (PP = 1), by global layer number:
        [b, heads of this rank, s, s] each, in the teacher's dtype."""
        tctx = self.teacher_contexts[i]
        tctx.recorded = {}
        with torch.no_grad(), runtime.native_torch():
            self.teacher[i](batch.input_ids, batch.position_ids, batch.attention_mask)
        recorded, tctx.recorded = tctx.recorded, {}
        return recorded

    def before_schedule(self, model: List[torch.nn.Module], data_iterators: list, num_microbatches: int) -> list:
        """With PP > 1: take this schedule's micro-batches from `data_iterators` (one per chunk), run the teacher
        on them through megatron-core's forward-only pipeline schedule (queueing each stage's maps), and return
        iterators that replay the same micro-batches to the student. Otherwise returns `data_iterators`."""
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return data_iterators
        if any(self.queues):
            raise RuntimeError("attention transfer: teacher maps of a previous schedule were not used")
        batches = [[next(it) for _ in range(num_microbatches)] for it in data_iterators]

        def teacher_step(data_iterator, chunk):
            i = _index(self.teacher, chunk)
            batch = next(data_iterator)
            tctx = self.teacher_contexts[i]
            tctx.recorded = {}
            with runtime.native_torch():
                out = chunk(batch.input_ids, batch.position_ids, batch.attention_mask)
            self.queues[i].append(tctx.recorded)
            tctx.recorded = {}
            return out, _no_loss

        teacher_iters = [iter(b) for b in batches]
        with torch.no_grad():
            get_forward_backward_func()(
                forward_step_func=teacher_step,
                data_iterator=teacher_iters if len(teacher_iters) > 1 else teacher_iters[0],
                model=self.teacher, num_microbatches=num_microbatches, seq_length=self.cfg.model.seq_length,
                micro_batch_size=self.cfg.train.micro_batch_size, forward_only=True)
        return [iter(b) for b in batches]

    def before_forward(self, chunk: torch.nn.Module, batch) -> None:
        """Give the student chunk the teacher's maps for this micro-batch (and the loss mask and loss scale
        the distillation term needs)."""
        i = _index(self.student, unwrap(chunk))
        ctx = self.student_contexts[i]
        if ctx.supplied:
            raise RuntimeError(f"attention transfer: the teacher's maps for layers {sorted(ctx.supplied)} were not "
                               "used")
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            ctx.supplied = self.run_teacher(i, batch)
        else:
            if not self.queues[i]:
                raise RuntimeError("attention transfer: no teacher maps queued for this micro-batch; with pipeline "
                                   "parallelism before_schedule() must run before the student's schedule")
            ctx.supplied = self.queues[i].popleft()
        ctx.query_mask = batch.loss_mask
        scale_fn = get_model_config(chunk).grad_scale_func
        ones = torch.ones((), device=batch.loss_mask.device)
        ctx.loss_scale = scale_fn(ones).reshape(()) if scale_fn is not None else ones

    def metrics(self, tokens: float) -> dict:
        """{"attn_kl": mean KL(teacher || student) per layer, head and loss-masked token} in distill mode, summed
        since the last call over all ranks (a collective: every rank calls it); {} in copy mode."""
        total = torch.zeros((), dtype=torch.float64, device=runtime.device())
        for ctx in self.student_contexts:
            if ctx.kl_sum is not None:
                total = total + ctx.kl_sum.to(total.device)
            ctx.kl_sum = None
        if self.mode != "distill":
            return {}
        dist.all_reduce(total)  # disjoint parts: DP samples x PP layers x TP heads
        m = self.cfg.model
        return {"attn_kl": float(total) / max(tokens * m.num_layers * m.num_attention_heads, 1.0)}
