"""Training checkpoints through megatron-core dist_checkpointing: save, resume exactly, reshard.

A checkpoint holds the model (LM and TempNet), the optimizer (megatron-core's optimizer sharded state,
the distributed optimizer included), the LR scheduler, the RNG states of every rank, the data position
(consumed samples), the iteration and the run's configuration. Tensors are stored as global tensors in
megatron-core's `torch_dist` format, so a checkpoint saved at one TP/PP/DP layout loads at another (the
padded vocabulary does not depend on TP, so the embedding, the output layer and TempNet's W1 reshard
like everything else).

On disk:

    SAVE_DIR/
      latest_checkpointed_iteration.txt   iteration of the newest complete checkpoint (tmp file + rename)
      iter_0000100/                        one complete checkpoint
        metadata.json, common.pt, .metadata, __*_*.distcp     megatron-core / torch DCP files
        tempnet_checkpoint.json            ours: format, iteration, consumed samples, config, layout
      .tmp_iter_0000110/                   a save in progress, or one that was interrupted: never loaded

A save writes everything into `.tmp_iter_N`, then rank 0 writes tempnet_checkpoint.json, renames the
folder to `iter_N`, and only then replaces the tracker file (written to a temporary name, fsynced and
renamed). A crash at any point leaves the tracker naming the previous complete checkpoint. Only the
newest `--keep-last` checkpoints are kept (0 keeps all).

What is stored how: model and optimizer tensors as ShardedTensors (TempNet's W1 split by TP along the
vocabulary, the rest of TempNet replicated; the distributed optimizer in its "fully_reshardable" form,
which stores the same global tensors as the plain optimizer, so either kind loads the other's); each
rank's RNG states (torch CPU and CUDA generators, Python, NumPy, megatron-core's CUDA RNG tracker) as a
ShardedObject indexed by (PP, TP, DP) rank, as Megatron-LM does; scheduler state, iteration, consumed
samples, layout and configuration in common.pt (plain values).

Resuming (`--load DIR`) restores weights, optimizer, scheduler, per-rank RNG states (only at the layout
they were saved at: a different TP/PP/DP has other ranks, so they are left as seeded, with a note),
iteration and consumed samples; the data iterators restart at the consumed samples, so the resumed run
gives the same losses and weights as an uninterrupted one. `--load` may name a save folder (its tracker
is followed) or one `iter_N` folder. `--pretrained-checkpoint DIR` loads the model weights only
(`load_model_weights`), e.g. an LM converted from Hugging Face, with a fresh TempNet.

Safety of loading (what can run code):
- torch DCP reads its `.metadata` file with `pickle.load` (torch 2.13, FileSystemReader.read_metadata),
  and loads each ShardedObject with `torch.load(..., weights_only=False)` (DefaultLoadPlanner.load_bytes).
  Both would run code from a crafted checkpoint. We do not use those two paths: `SafeTorchDistLoadStrategy`
  reads `.metadata` with an unpickler that only builds the DCP metadata classes (and torch.Size / dtypes),
  and loads ShardedObjects with `torch.load(weights_only=True)`.
- tensor data (`*.distcp`) is read by DCP with `torch.load(weights_only=True)`; `common.pt` is read by us
  with `torch.load(weights_only=True)`; `metadata.json`, `tempnet_checkpoint.json` and the tracker are
  JSON / text.
- what is not protected: the size of what is read (a crafted checkpoint can ask for huge tensors), and
  checkpoints written by other tools may hold objects that weights_only refuses (then loading fails with
  a clear error, never runs them). Our own checkpoints contain only tensors and plain Python values.
"""
# Over 500 lines: several jobs (layout, safe loading, state assembly, compatibility) not yet split into modules; open work.
from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..config import Config, ConfigError
from ..models.registry import model_dims
from .checkpoint_integrity import record_checksums, verify_checkpoint

TRACKER_FILE = "latest_checkpointed_iteration.txt"
INFO_FILE = "tempnet_checkpoint.json"
FORMAT = "megatron-tempnet"
FORMAT_VERSION = 1
TMP_PREFIX = ".tmp_"
OLD_PREFIX = ".old_"
# Test hook: "pause:ITER[:STAGE]" or "die:ITER[:STAGE]", STAGE "written" (default: all files of the
# checkpoint written into the temporary folder, not yet published) or "renamed" (folder renamed, tracker
# not yet updated). Used by tests/test_checkpoint_crash.py to kill a run inside a save.
TEST_HOOK_ENV = "MEGATRON_TEMPNET_TEST_SAVE_HOOK"
# Sharding of the distributed optimizer's state in a checkpoint: the reshardable one (any TP/PP/DP).
DISTRIB_OPTIM_SHARDING = "fully_reshardable"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be saved or loaded. The message names the problem and the fix."""


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


@dataclass
class LoadedState:
    """What `load_checkpoint` restored besides tensors."""

    iteration: int
    consumed_samples: int
    path: str
    rng_restored: bool


# ----------------------------------------------------------------------------------------------------
# Finding checkpoints
# ----------------------------------------------------------------------------------------------------


def read_info(ckpt_dir: str | os.PathLike) -> dict:
    """The tempnet_checkpoint.json of one iteration folder (raises CheckpointError if it is not one)."""
    d = Path(ckpt_dir)
    info_path = d / INFO_FILE
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {d} does not exist; pass an existing save folder or iter_N folder")
    if not info_path.is_file():
        if d.name.startswith(TMP_PREFIX) or (d / "metadata.json").is_file() or any(d.glob("*.distcp")):
            raise CheckpointError(
                f"checkpoint {d} is incomplete (no {INFO_FILE}): its save was interrupted; load the save folder "
                f"{d.parent} (its tracker names the last complete checkpoint) or another iter_N folder")
        raise CheckpointError(
            f"{d} is not a megatron-tempnet checkpoint (no {INFO_FILE}); pass a folder written with --save "
            f"or by tools/convert_to_hf.py --from-hf")
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{info_path} is unreadable ({err}); the checkpoint is damaged, load another one") from None
    if info.get("format") != FORMAT or not isinstance(info.get("format_version"), int):
        raise CheckpointError(f"{info_path} is not a {FORMAT} checkpoint description")
    if info["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{d} was written by a newer megatron-tempnet (format {info['format_version']} > {FORMAT_VERSION}); "
            "upgrade megatron-tempnet to load it")
    if not (d / "metadata.json").is_file():
        raise CheckpointError(f"checkpoint {d} is incomplete (no metadata.json); load another one")
    return info


def complete_checkpoints(save_dir: str | os.PathLike) -> List[Path]:
    """The complete iter_N folders of a save folder, oldest first."""
    d = Path(save_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        if p.is_dir() and p.name.startswith("iter_") and p.name[5:].isdigit() and (p / INFO_FILE).is_file():
            found.append((int(p.name[5:]), p))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | os.PathLike, *, allow_empty: bool = False) -> Optional[Path]:
    """The iteration folder to load for `path`: a save folder (its tracker is followed) or one iter_N
    folder. Returns None for an empty (or absent) save folder when `allow_empty`; otherwise a missing or
    incomplete checkpoint is a CheckpointError that says what to do."""
    p = Path(path)
    if (p / INFO_FILE).is_file() or p.name.startswith(TMP_PREFIX) or (p / "metadata.json").is_file():
        read_info(p)  # checks completeness
        return p
    if not p.exists():
        if allow_empty:
            return None
        raise CheckpointError(
            f"checkpoint folder {p} does not exist; check the path, or drop --load to start from scratch "
            "(with --load equal to --save, a run starts from scratch until its first save)")
    if not p.is_dir():
        raise CheckpointError(f"{p} is a file, not a checkpoint folder; pass a folder written with --save")
    tracker = p / TRACKER_FILE
    if tracker.is_file():
        text = tracker.read_text().strip()
        if not text.isdigit():
            raise CheckpointError(
                f"{tracker} holds {text!r}, not an iteration number; fix or delete it, or pass one iter_N folder")
        target = p / iter_dir_name(int(text))
        if not (target / INFO_FILE).is_file():
            complete = complete_checkpoints(p)
            fix = (f"the newest complete checkpoint is {complete[-1]}: resume with --load {complete[-1]}" if complete
                   else f"{p} holds no complete checkpoint: drop --load to start from scratch")
            raise CheckpointError(f"{tracker} names iteration {int(text)} but {target} is missing or incomplete; {fix}")
        read_info(target)
        return target
    complete = complete_checkpoints(p)
    if complete:
        raise CheckpointError(
            f"{p} has no {TRACKER_FILE}, so which checkpoint is the latest is unknown; pass one iter_N folder "
            f"directly (found: {', '.join(c.name for c in complete)})")
    if allow_empty:
        return None
    partial = sorted(q.name for q in p.iterdir() if q.name.startswith(TMP_PREFIX))
    hint = f" (only interrupted saves: {', '.join(partial)})" if partial else ""
    raise CheckpointError(
        f"{p} holds no checkpoint{hint}; pass a folder written with --save, or drop --load to start from scratch")


# ----------------------------------------------------------------------------------------------------
# State dicts
# ----------------------------------------------------------------------------------------------------


def _unwrap(model: torch.nn.Module):
    while hasattr(model, "module"):
        model = model.module
    return model


def sharded_state_dict_metadata() -> dict:
    """The `metadata` megatron-core's sharded_state_dict methods take, for how this project saves and loads."""
    from megatron.core import parallel_state

    return {
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
        "distrib_optim_sharding_type": DISTRIB_OPTIM_SHARDING,
        "chained_optim_avoid_prefix": True,
        "singleton_local_shards": False,
    }


def tempnet_sharded_state_dict(tempnet: torch.nn.Module, prefix: str = "", sharded_offsets=(),
                               metadata: Optional[dict] = None) -> dict:
    """TempNet's sharded state dict: W1 ([d, V/TP], vocabulary-parallel) is split by TP along dim 1, the
    rest is replicated. (megatron-core's default for a plain module would mark W1 replicated too.)"""
    from megatron.core import parallel_state
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    dp_cp_group = (metadata or {}).get("dp_cp_group") or parallel_state.get_data_parallel_group(with_context_parallel=True)
    return make_sharded_tensors_for_checkpoint(
        tempnet.state_dict(prefix="", keep_vars=True), prefix, {"w1": 1}, sharded_offsets,
        tp_group=parallel_state.get_tensor_model_parallel_group(), dp_cp_group=dp_cp_group)


def model_sharded_state_dict(chunk: torch.nn.Module, metadata: Optional[dict] = None) -> dict:
    """One model chunk's sharded state dict, TempNet included with W1 split along the vocabulary."""
    metadata = metadata or sharded_state_dict_metadata()
    lm = _unwrap(chunk)  # keys without the DDP wrapper's "module." prefix
    sd = lm.sharded_state_dict(prefix="", metadata=metadata)
    tempnet = getattr(lm, "tempnet", None)
    if tempnet is not None and not hasattr(type(tempnet), "sharded_state_dict"):
        for key in [k for k in sd if k.startswith("tempnet.")]:
            del sd[key]
        sd.update(tempnet_sharded_state_dict(tempnet, "tempnet.", (), metadata))
    return sd


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(), "world": dist.get_world_size()}


def _rng_state() -> dict:
    """This rank's RNG states as tensors and plain values (loadable with weights_only=True)."""
    from megatron.core import tensor_parallel

    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch_cpu": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()}
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch_cpu"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if torch.cuda.is_available() and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(data: Any, layout: dict):
    """Per-rank RNG states: one ShardedObject per (PP, TP, DP) rank, as Megatron-LM stores them."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", data, (layout["pp"], layout["tp"], layout["dp"]),
                         (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                          ps.get_data_parallel_rank()), replica_id=0)


def _init_distributed_optimizer_state(optimizer) -> None:
    """Give a distributed optimizer that has not stepped yet a (zero) Adam state before loading into it.

    Without apex/TE, megatron-core's DistributedOptimizer.state_dict() reads the common 'step' from the
    per-parameter state, which a fresh optimizer does not have yet (it asserts); the loaded checkpoint
    overwrites these placeholders."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(inner, DistributedOptimizer) or len(inner.optimizer.state) > 0:
            continue
        for group in inner.optimizer.param_groups:
            for p in group["params"]:
                st = inner.optimizer.state[p]
                st["exp_avg"] = torch.zeros_like(p.data)
                st["exp_avg_sq"] = torch.zeros_like(p.data)
                st["step"] = torch.tensor(0.0)


def _state_dict(model: List[torch.nn.Module], optimizer, scheduler, *, is_loading: bool, with_rng: bool,
                layout: dict) -> dict:
    metadata = sharded_state_dict_metadata()
    sd: Dict[str, Any] = {}
    for i, chunk in enumerate(model):
        sd[_model_key(i, len(model))] = model_sharded_state_dict(chunk, metadata)
    if optimizer is not None:
        if is_loading:
            _init_distributed_optimizer_state(optimizer)
        sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=is_loading, metadata=metadata)
    if scheduler is not None:
        sd["scheduler"] = scheduler.state_dict()
    if with_rng:
        sd["rng_state"] = _rng_sharded_object(None if is_loading else _rng_state(), layout)
    return sd


# ----------------------------------------------------------------------------------------------------
# Safe loading strategies
# ----------------------------------------------------------------------------------------------------

# What a DCP .metadata pickle may build: the metadata dataclasses and torch value types, nothing callable.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.planner", n) for n in (
        "SavePlan", "WriteItem", "TensorWriteData", "WriteItemType", "LoadItemType")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # looks a torch.layout up by name
    ("torch", "Size"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch":
            obj = getattr(torch, name, None)
            if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        raise pickle.UnpicklingError(
            f"checkpoint metadata (.metadata) refers to {module}.{name}, which is not one of the DCP metadata "
            "classes this loader builds; refusing to unpickle it (a checkpoint written by another torch / "
            "megatron-core version, or a tampered one)")


def _safe_strategies():
    """(sharded, common) load strategies that never unpickle arbitrary objects (see the module docstring)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(dcp.FileSystemReader):
        def __init__(self, path):
            super().__init__(path)
            self._cached_metadata = None

        def read_metadata(self, *args, **kwargs):
            if self._cached_metadata is None:
                path = self._get_metadata_path(kwargs.get("rank"))
                with self.fs.create_stream(path, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
                if getattr(metadata, "storage_meta", None) is None:
                    metadata.storage_meta = StorageMeta()
                metadata.storage_meta.load_id = self.load_id
                self._cached_metadata = metadata
            return self._cached_metadata

    class SafeLoadPlanner(mcore_torch.MCoreLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    class SafeTorchDistLoadStrategy(mcore_torch.TorchDistLoadShardedStrategy):
        """megatron-core's torch_dist loading, with the safe reader and planner above."""

        reader = SafeFileSystemReader

        def load(self, sharded_state_dict, checkpoint_dir):
            tensors = [t for t in nested_values(sharded_state_dict) if isinstance(t, ShardedTensor)]
            flexible = [t for t in tensors if not t.allow_shape_mismatch]
            mismatch_ok = {t.key: t for t in tensors if t.allow_shape_mismatch}
            orig = sharded_state_dict
            sharded_state_dict, flat_mapping, rename_mapping = \
                mcore_torch._replace_state_dict_keys_with_sharded_keys(sharded_state_dict)
            reader = SafeFileSystemReader(checkpoint_dir)
            with warnings.catch_warnings():  # megatron-core 0.16 loads through torch's ShardedTensor, which warns
                warnings.filterwarnings("ignore", message=".*Please use DTensor instead", category=FutureWarning)
                pyt_state_dict = mcore_torch.mcore_to_pyt_state_dict(sharded_state_dict, True)
                dcp.load(pyt_state_dict, storage_reader=reader, planner=SafeLoadPlanner(
                    shapes_validation_sharded_tensors=flexible, allow_shape_mismatch_sharded_tensors=mismatch_ok))
            self.cached_global_metadata = reader.read_metadata()
            loaded = {k: mcore_torch._unwrap_pyt_sharded_tensor(v) for k, v in pyt_state_dict.items()}
            loaded = mcore_torch._replace_sharded_keys_with_state_dict_keys(loaded, flat_mapping, rename_mapping)
            mcore_torch._restore_dict_types(loaded, orig)
            return loaded

        def load_tensors_metadata(self, checkpoint_dir, metadata=None):
            if metadata is None:
                metadata = SafeFileSystemReader(checkpoint_dir).read_metadata()
            return super().load_tensors_metadata(checkpoint_dir, metadata)

        def load_sharded_metadata(self, checkpoint_dir):
            raise NotImplementedError("not used by megatron-tempnet")

    class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            path = os.path.join(checkpoint_dir, COMMON_STATE_FNAME)
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except FileNotFoundError:
                raise CheckpointError(f"checkpoint {checkpoint_dir} is incomplete ({COMMON_STATE_FNAME} missing); "
                                      "load another one") from None

    return SafeTorchDistLoadStrategy(), SafeCommonLoadStrategy()


def checkpoint_tensor_shapes(ckpt_dir: str | os.PathLike) -> Dict[str, tuple]:
    """Global shape of every tensor stored in a checkpoint, read safely from its DCP metadata."""
    sharded, _ = _safe_strategies()
    return {k: tuple(v.global_shape) for k, v in sharded.load_tensors_metadata(str(ckpt_dir)).items()}


def read_checkpoint_tensors(ckpt_dir: str | os.PathLike, prefix: str = "") -> Dict[str, torch.Tensor]:
    """Every stored tensor whose key starts with `prefix`, as one full (unsharded) CPU tensor each, read
    in this process without torch.distributed (for inspection and tests; loading into a model goes
    through `load_checkpoint` / `load_model_weights`). Keys are megatron-core's global keys, e.g.
    "decoder.layers.self_attention.linear_qkv.weight" (layers stacked on dim 0) or
    "optimizer.state.exp_avg.tempnet.w1"."""
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    read_info(ckpt_dir)
    sharded, _ = _safe_strategies()
    reader = sharded.reader(str(ckpt_dir))
    metadata = reader.read_metadata()
    out = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in metadata.state_dict_metadata.items()
           if isinstance(v, TensorStorageMetadata) and k.startswith(prefix)}
    dcp.load(out, storage_reader=reader, no_dist=True)
    return out


def safe_dist_load(sharded_state_dict: dict, ckpt_dir: Path) -> dict:
    """megatron-core's dist_checkpointing.load through the safe strategies; a mismatch is a CheckpointError."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    sharded, common = _safe_strategies()
    try:
        return dist_checkpointing.load(sharded_state_dict, str(ckpt_dir), sharded_strategy=sharded,
                                       common_strategy=common)
    except (CheckpointingException, KeyError) as err:
        raise CheckpointError(
            f"cannot load {ckpt_dir}: {err}. The checkpoint does not match this model; run with the model "
            "flags it was saved with (see its tempnet_checkpoint.json)") from err
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"refusing to load {ckpt_dir}: {err}") from err


# ----------------------------------------------------------------------------------------------------
# Compatibility checks (clear errors before any tensor is read)
# ----------------------------------------------------------------------------------------------------


def _shape_fields(cfg_model: dict, tempnet: dict) -> dict:
    from ..config import ModelConfig

    m = ModelConfig(**{k: v for k, v in cfg_model.items() if k in ModelConfig.__dataclass_fields__})
    dims = model_dims(m)
    return {
        "arch": m.arch, "num_layers": m.num_layers, "hidden_size": m.hidden_size,
        "num_attention_heads": m.num_attention_heads,
        "num_query_groups": m.num_query_groups or m.num_attention_heads,
        "ffn_hidden_size": dims.ffn_hidden_size,
        "padded vocabulary": dims.padded_vocab_size,
        "position embeddings": dims.position_embeddings,
        "tempnet": bool(tempnet.get("enabled")),
        "tempnet_kind": tempnet.get("kind", "network") if tempnet.get("enabled") else None,
        "tempnet_hidden_size": tempnet.get("hidden_size") if tempnet.get("enabled") and
        tempnet.get("kind", "network") == "network" else None,
    }


_FLAG = {"arch": "--arch", "num_layers": "--num-layers", "hidden_size": "--hidden-size",
         "num_attention_heads": "--num-attention-heads", "num_query_groups": "--num-query-groups",
         "ffn_hidden_size": "--ffn-hidden-size", "padded vocabulary": "--vocab-size / --make-vocab-size-divisible-by",
         "position embeddings": "--max-position-embeddings / --seq-length", "tempnet": "--tempnet-enabled",
         "tempnet_kind": "--tempnet-kind", "tempnet_hidden_size": "--tempnet-hidden-size"}


def check_layout_fits(saved_model: dict, tp: int, pp: int, vpp: Optional[int] = None) -> None:
    """Refuse a TP/PP that cannot hold a checkpoint's model, naming the sizes that would work."""
    f = _shape_fields(saved_model, {})
    problems = []
    divisors = lambda n: [d for d in range(1, n + 1) if n % d == 0]  # noqa: E731
    for what, n in (("attention heads", f["num_attention_heads"]), ("query groups", f["num_query_groups"]),
                    ("FFN hidden size", f["ffn_hidden_size"])):
        if n % tp:
            problems.append(f"its {n} {what} do not split over TP={tp}")
    if f["padded vocabulary"] and f["padded vocabulary"] % tp:
        problems.append(f"its padded vocabulary {f['padded vocabulary']} does not split over TP={tp}")
    stages = pp * (vpp or 1)
    if f["num_layers"] % stages:
        problems.append(f"its {f['num_layers']} layers do not split over {stages} pipeline stages")
    if problems:
        tps = [d for d in divisors(f["num_query_groups"]) if f["num_attention_heads"] % d == 0
               and f["ffn_hidden_size"] % d == 0 and (not f["padded vocabulary"] or f["padded vocabulary"] % d == 0)]
        raise CheckpointError(
            f"the checkpoint's model cannot be laid out at TP={tp} x PP={pp}: {'; '.join(problems)}. "
            f"Use a TP in {tps} and a PP in {divisors(f['num_layers'])}")


def check_model_matches(saved_cfg: dict, cfg: Config, where: str, *, tempnet_optional: bool) -> None:
    """Refuse a checkpoint whose model shape differs from this run's, naming each difference."""
    saved = _shape_fields(saved_cfg["model"], saved_cfg.get("tempnet", {}))
    here = _shape_fields(vars(cfg.model), vars(cfg.tempnet))
    keys = [k for k in saved if k not in (("tempnet", "tempnet_kind", "tempnet_hidden_size") if tempnet_optional else ())]
    diffs = [k for k in keys if saved[k] != here[k]]
    if diffs:
        lines = "; ".join(f"{_FLAG[k]}: checkpoint {saved[k]}, this run {here[k]}" for k in diffs)
        raise CheckpointError(
            f"checkpoint {where} holds another model shape ({lines}); run with the checkpoint's model flags "
            f"(they are in {Path(where) / INFO_FILE})")


# ----------------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _test_hook(iteration: int, stage: str, folder: Path) -> None:
    spec = os.environ.get(TEST_HOOK_ENV)
    if not spec:
        return
    parts = spec.split(":")
    action, it = parts[0], int(parts[1])
    want = parts[2] if len(parts) > 2 else "written"
    if it != iteration or want != stage:
        return
    (folder.parent / f".test_hook_{stage}_{dist.get_rank()}").write_text(str(folder))
    if action == "die":
        os._exit(137)
    while True:  # pause: the test kills us
        time.sleep(1)


def save_checkpoint(cfg: Config, iteration: int, consumed_samples: int, model: List[torch.nn.Module],
                    optimizer=None, scheduler=None, *, save_dir: Optional[str] = None,
                    keep_last: Optional[int] = None) -> Path:
    """Save the full training state of every rank as `save_dir/iter_N` and publish it atomically.

    Called on every rank. Model-only checkpoints (optimizer and scheduler None) hold no RNG either;
    they start runs through --pretrained-checkpoint."""
    from megatron.core import dist_checkpointing

    root = Path(save_dir or cfg.checkpoint.save)
    keep = cfg.checkpoint.keep_last if keep_last is None else keep_last
    name = iter_dir_name(iteration)
    final, tmp = root / name, root / f"{TMP_PREFIX}{name}"
    rank = dist.get_rank()
    layout = _layout()
    layout["vpp"] = cfg.parallel.virtual_pipeline_model_parallel_size
    full = optimizer is not None
    t0 = time.perf_counter()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by an interrupted save of the same iteration
        tmp.mkdir()
    dist.barrier()

    sd = _state_dict(model, optimizer, scheduler, is_loading=False, with_rng=full, layout=layout)
    info = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "iteration": iteration,
        "consumed_samples": consumed_samples, "contents": ["model", "optimizer", "scheduler", "rng"] if full else ["model"],
        "layout": layout, "config": cfg.to_dict(),
    }
    sd.update(iteration=iteration, consumed_samples=consumed_samples, layout=layout,
              config_json=json.dumps(info["config"]), format_version=FORMAT_VERSION)
    dist_checkpointing.save(sd, str(tmp), validate_access_integrity=True)
    dist.barrier()
    record_checksums(tmp)  # collective; before the description file that publishes the folder
    _test_hook(iteration, "written", tmp)
    if rank == 0:
        _write_atomic(tmp / INFO_FILE, json.dumps(info, indent=1))
        _fsync_dir(tmp)
        old = None
        if final.exists():  # the same iteration saved before (a run resumed from an earlier checkpoint)
            old = root / f"{OLD_PREFIX}{name}"
            if old.exists():
                shutil.rmtree(old)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(root)
        _test_hook(iteration, "renamed", final)
        _write_atomic(root / TRACKER_FILE, f"{iteration}\n")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _prune(root, keep, iteration)
        print(f"saved checkpoint {final} ({time.perf_counter() - t0:.1f} s)", flush=True)
    dist.barrier()
    return final


def _prune(root: Path, keep_last: int, current: int) -> None:
    """Rank 0: drop stale temporary folders and all but the newest `keep_last` checkpoints."""
    for p in root.iterdir():
        if p.is_dir() and (p.name.startswith(TMP_PREFIX) or p.name.startswith(OLD_PREFIX)):
            shutil.rmtree(p, ignore_errors=True)
    if keep_last and keep_last > 0:
        complete = [p for p in complete_checkpoints(root) if int(p.name[5:]) <= current]
        for p in complete[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, file=sys.stderr, flush=True)


def _param_groups_of(sd: dict) -> Optional[list]:
    if "param_groups" in sd:
        return sd["param_groups"]
    inner = sd.get("optimizer")
    return inner.get("param_groups") if isinstance(inner, dict) else None


def _load_inner_optimizer(inner, sd: dict) -> None:
    """inner.load_state_dict(sd); for the distributed optimizer with torch's Adam (no apex/TE), load the
    parameter state with Adam's per-parameter 'step' set aside: megatron-core 0.16 copies every state
    entry from the checkpoint's parameter state, which does not carry 'step' (KeyError otherwise).
    The step itself is restored from the parameter groups by load_state_dict.""" 
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if not isinstance(inner, DistributedOptimizer) or "param_state" not in sd:
        inner.load_state_dict(sd)
        return
    sd = dict(sd)
    param_state, sharding = sd.pop("param_state"), sd.pop("param_state_sharding_type")
    inner.load_state_dict(sd)
    steps = {p: st.pop("step") for p, st in inner.optimizer.state.items() if "step" in st}
    try:
        loader = {"fully_reshardable": inner.load_parameter_state_from_fully_reshardable,
                  "fully_sharded_model_space": inner.load_parameter_state_from_fs_model_space,
                  "dp_reshardable": inner.load_parameter_state_from_dp_reshardable}[sharding]
        loader(param_state)
    finally:
        # One tensor per parameter: megatron-core hands every parameter the same step tensor, and torch's
        # Adam increments each parameter's step in place (it would advance once per parameter).
        for p, step in steps.items():
            inner.optimizer.state[p]["step"] = step.clone()


def load_optimizer_state(optimizer, state_dict) -> None:
    """optimizer.load_state_dict(state_dict), with parameter groups matched by position.

    megatron-core matches saved and live parameter groups by (wd_mult, lr_mult, is_expert_parallel,
    is_decoupled_lr). TempNet's groups differ from the LM's only in their learning rates, so two groups
    share each key and megatron-core would pair them wrongly (mixing learning rates, or failing on the
    group sizes). Both sides are built the same way (groups are gathered over all ranks and sorted, so
    every rank and layout has the same list), so each group is tagged with its position for the load and
    untagged after."""
    inners = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    sds = [state_dict] if len(inners) == 1 else [state_dict[i] for i in range(len(inners))]
    tagged = []
    try:
        for inner, sd in zip(inners, sds):
            live, saved = inner.optimizer.param_groups, _param_groups_of(sd)
            if saved is None or len(saved) != len(live):
                raise CheckpointError(
                    f"the checkpoint's optimizer has {len(saved or [])} parameter groups, this run's has {len(live)}: "
                    "it was saved with other optimizer settings (TempNet on/off, --mode); resume with the same "
                    "settings or start from its weights with --pretrained-checkpoint")
            originals = [g.get("is_decoupled_lr", False) for g in live]
            tagged.append((inner, originals))
            for i, (g, sg) in enumerate(zip(live, saved)):
                g["is_decoupled_lr"] = sg["is_decoupled_lr"] = f"group{i}"
        for inner, sd in zip(inners, sds):
            _load_inner_optimizer(inner, sd)
    finally:
        for inner, originals in tagged:
            for g, value in zip(inner.optimizer.param_groups, originals):
                g["is_decoupled_lr"] = value


def _main_params_from_model_weights(sd: dict, ckpt: Path) -> None:
    """The distributed optimizer also loads its main (fp32) parameters, "optimizer.state.param.KEY"; a
    plain-optimizer checkpoint of an fp32 model has none: they are the model weights "KEY". The template's
    entries for them are replaced by this rank's model parameters (loaded in the same call)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    stored = checkpoint_tensor_shapes(ckpt)
    def ident(t, key):  # one layer's tensor: layers share keys and differ in offsets (or factory closures)
        return (key, tuple(t.global_offset)) if hasattr(t, "global_offset") else (key, id(t.build_fn))

    model_data = {}
    for key, value in sd.items():
        if key.startswith("model"):
            for t in nested_values(value):
                if isinstance(t, ShardedBase) and hasattr(t, "data"):
                    model_data[ident(t, t.key)] = t.data
    prefix = "optimizer.state.param."

    def visit(node):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in list(items):
            key = getattr(v, "key", None)
            if isinstance(v, ShardedBase) and key and key.startswith(prefix) and key not in stored:
                node[k] = LocalNonpersistentObject(model_data[ident(v, key[len(prefix):])])
            elif isinstance(v, (dict, list)):
                visit(v)

    visit(sd["optimizer"])


def _switch_optimizer_format(sd: dict, *, to_distributed: bool) -> dict:
    """Re-nest the non-tensor part of a loaded optimizer state saved by the other optimizer kind.

    The tensors are interchangeable: the distributed optimizer's reshardable format stores the same
    global tensors (optimizer.state.exp_avg.KEY, ...) as the plain optimizer. Only the small common part
    differs: the plain optimizer keeps {"state": {..., "common_step"}, "param_groups"}, the distributed
    one {"optimizer": {"param_groups" (with "step")}, "param_state", "param_state_sharding_type"}."""
    if to_distributed:  # plain checkpoint -> distributed optimizer
        step = sd["state"].get("common_step") if isinstance(sd.get("state"), dict) else None
        groups = [{k: v for k, v in g.items() if k != "params"} for g in sd.get("param_groups", [])]
        for g in groups:
            g["step"] = float(step) if step is not None else 0.0
        return {"optimizer": {"param_groups": groups}, "param_state": sd["param_state"],
                "param_state_sharding_type": sd.get("param_state_sharding_type", DISTRIB_OPTIM_SHARDING)}
    inner = sd.get("optimizer", {})
    saved_groups = inner.get("param_groups", [])
    live_groups = sd.get("param_groups", [])
    if len(saved_groups) != len(live_groups):
        raise CheckpointError("the checkpoint's optimizer parameter groups do not match this run's; resume with "
                              "the settings it was saved with, or use --pretrained-checkpoint")
    steps = {g.get("step") for g in saved_groups}
    groups = [{**{k: v for k, v in sg.items() if k != "step"}, "params": lg["params"]}
              for sg, lg in zip(saved_groups, live_groups)]
    state = dict(sd.get("state", {}))
    step = next(iter(steps)) if steps else None
    if step:
        state["common_step"] = torch.tensor(float(step))
    return {"state": state, "param_groups": groups}


def check_integrity(ckpt: Path, cfg: Optional[Config]) -> None:
    """Refuse a damaged checkpoint before any tensor is read (checkpoint_integrity.py); sizes always, hashes
    unless --no-verify-checkpoint. Called on every rank (the ranks share the hashing)."""
    hashes = cfg is None or cfg.checkpoint.verify_checkpoint
    if not verify_checkpoint(ckpt, hashes=hashes):
        _log(f"note: {ckpt} has no recorded checksums (written by an older megatron-tempnet): it loads unverified")


def load_checkpoint(cfg: Config, model: List[torch.nn.Module], optimizer, scheduler,
                    path: Optional[str] = None) -> Optional[LoadedState]:
    """Restore a full training state from `path` (default --load) into this run's model, optimizer and
    scheduler, at this run's layout. Returns None when --load is the --save folder and holds no checkpoint
    yet (a fresh start), else what was restored. Called on every rank."""
    path = path or cfg.checkpoint.load
    allow_empty = bool(cfg.checkpoint.save) and Path(path).resolve() == Path(cfg.checkpoint.save).resolve()
    ckpt = resolve_checkpoint(path, allow_empty=allow_empty)
    if ckpt is None:
        _log(f"no checkpoint in {path} yet: starting from scratch")
        return None
    info = read_info(ckpt)
    if "optimizer" not in info["contents"]:
        raise CheckpointError(
            f"{ckpt} holds model weights only (no optimizer state), so a run cannot resume from it; "
            f"start from it with --pretrained-checkpoint {ckpt}")
    saved = info["config"]
    check_layout_fits(saved["model"], cfg.parallel.tensor_model_parallel_size,
                      cfg.parallel.pipeline_model_parallel_size, cfg.parallel.virtual_pipeline_model_parallel_size)
    check_model_matches(saved, cfg, str(ckpt), tempnet_optional=False)
    if saved["train"]["mode"] != cfg.train.mode:
        raise CheckpointError(
            f"{ckpt} was saved in --mode {saved['train']['mode']}, this run uses --mode {cfg.train.mode}: their "
            f"optimizers differ; resume with --mode {saved['train']['mode']}, or start the new mode from the "
            f"weights with --pretrained-checkpoint {ckpt}")
    check_integrity(ckpt, cfg)
    layout = _layout()
    same_layout = all(info["layout"].get(k) == layout[k] for k in ("tp", "pp", "dp"))
    sd = _state_dict(model, optimizer, scheduler, is_loading=True, with_rng=same_layout, layout=layout)
    scheduler_template = sd.pop("scheduler", None)
    if cfg.parallel.use_distributed_optimizer and not saved["parallel"]["use_distributed_optimizer"]:
        _main_params_from_model_weights(sd, ckpt)
    loaded = safe_dist_load(sd, ckpt)
    for i, chunk in enumerate(model):
        _unwrap(chunk).load_state_dict(loaded[_model_key(i, len(model))], strict=True)
    opt_sd = loaded["optimizer"]
    if bool(saved["parallel"]["use_distributed_optimizer"]) != bool(cfg.parallel.use_distributed_optimizer):
        opt_sd = _switch_optimizer_format(opt_sd, to_distributed=bool(cfg.parallel.use_distributed_optimizer))
    load_optimizer_state(optimizer, opt_sd)
    if scheduler is not None and scheduler_template is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    else:
        _log(f"note: {ckpt} was saved at TP={info['layout']['tp']} PP={info['layout']['pp']} DP={info['layout']['dp']}, "
             f"this run is TP={layout['tp']} PP={layout['pp']} DP={layout['dp']}: weights, optimizer and schedule "
             "are resharded; per-rank RNG states are not restored (the ranks differ)")
    _log(f"loaded checkpoint {ckpt} (iteration {info['iteration']}, {info['consumed_samples']} samples consumed)")
    return LoadedState(int(loaded["iteration"]), int(loaded["consumed_samples"]), str(ckpt), same_layout)


def load_model_weights(path: str, model: List[torch.nn.Module], cfg: Optional[Config] = None) -> Path:
    """Load only the model weights of a checkpoint (any layout) into `model` (finetune / frozen_lm).

    TempNet weights are loaded when the checkpoint has them with the same shape; otherwise TempNet keeps
    its fresh initialisation (an LM trained without TempNet, or converted from Hugging Face)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    ckpt = resolve_checkpoint(path)
    info = read_info(ckpt)
    if cfg is not None:
        check_model_matches(info["config"], cfg, str(ckpt), tempnet_optional=True)
    check_integrity(ckpt, cfg)
    shapes = checkpoint_tensor_shapes(ckpt)
    metadata = sharded_state_dict_metadata()
    sd = {}
    skipped_tempnet = False
    for i, chunk in enumerate(model):
        chunk_sd = model_sharded_state_dict(chunk, metadata)
        for key in list(chunk_sd):
            sh = chunk_sd[key]
            skey = getattr(sh, "key", None)
            if not isinstance(sh, (ShardedTensor, ShardedTensorFactory)):
                del chunk_sd[key]  # layers' _extra_state objects: no weights
                continue
            if key.startswith("tempnet."):
                gshape = tuple(getattr(sh, "global_shape", ()))
                if skey not in shapes or shapes[skey] != gshape:
                    del chunk_sd[key]
                    skipped_tempnet = True
            elif skey not in shapes:
                raise CheckpointError(
                    f"{ckpt} has no tensor {skey}, which this model needs; it holds another architecture "
                    f"(its config: arch {info['config']['model']['arch']}); pass a checkpoint of this model")
        sd[_model_key(i, len(model))] = chunk_sd
    loaded = safe_dist_load(sd, ckpt)
    for i, chunk in enumerate(model):
        missing, _ = _unwrap(chunk).load_state_dict(loaded[_model_key(i, len(model))], strict=False)
        missing = [k for k in missing if not k.startswith("tempnet.") and not k.endswith("_extra_state")]
        if missing:
            raise CheckpointError(f"{ckpt} lacks weights {missing[:5]}; pass a checkpoint of this model")
    if skipped_tempnet:
        _log(f"note: {ckpt} has no TempNet of this shape: TempNet starts from its initialisation")
    _log(f"loaded model weights from {ckpt}")
    return ckpt


def valid_consumed_samples(cfg: Config, iteration: int) -> int:
    """Validation samples an uninterrupted run has used by `iteration` (one evaluation of eval_iters
    global batches every eval_interval iterations), so resumed evaluations continue the same stream."""
    t = cfg.train
    if not t.eval_interval:
        return 0
    return (iteration // t.eval_interval) * t.eval_iters * t.global_batch_size
