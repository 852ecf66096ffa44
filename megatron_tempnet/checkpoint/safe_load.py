"""Reading checkpoints without running code from them: megatron-core's torch_dist loading made safe, and a
reader of full tensors that needs no torch.distributed.

What can run code when a torch_dist checkpoint is read, and what we do instead:
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
from __future__ import annotations

import functools
import io
import os
import pickle
import warnings
from pathlib import Path
from typing import Dict, Tuple

import torch

from .folders import CheckpointError, read_info

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


@functools.lru_cache(maxsize=None)
def _reader_class():
    """torch DCP's FileSystemReader with `.metadata` read by the restricted unpickler (built on first use:
    importing torch.distributed.checkpoint is slow)."""
    from torch.distributed import checkpoint as dcp
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

    return SafeFileSystemReader


def safe_fs_reader(ckpt_dir: str | os.PathLike):
    """A DCP storage reader of one iter_N folder that never unpickles arbitrary objects."""
    return _reader_class()(str(ckpt_dir))


@functools.lru_cache(maxsize=None)
def _strategy_classes() -> Tuple[type, type]:
    """(sharded, common) megatron-core load strategy classes that use the safe reader and weights_only loads."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint._traverse import set_element

    reader_class = _reader_class()

    class SafeLoadPlanner(mcore_torch.MCoreLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    class SafeTorchDistLoadStrategy(mcore_torch.TorchDistLoadShardedStrategy):
        """megatron-core's torch_dist loading, with the safe reader and planner above."""

        reader = reader_class

        def load(self, sharded_state_dict, checkpoint_dir):
            tensors = [t for t in nested_values(sharded_state_dict) if isinstance(t, ShardedTensor)]
            flexible = [t for t in tensors if not t.allow_shape_mismatch]
            mismatch_ok = {t.key: t for t in tensors if t.allow_shape_mismatch}
            orig = sharded_state_dict
            sharded_state_dict, flat_mapping, rename_mapping = \
                mcore_torch._replace_state_dict_keys_with_sharded_keys(sharded_state_dict)
            reader = reader_class(checkpoint_dir)
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
                metadata = reader_class(checkpoint_dir).read_metadata()
            return super().load_tensors_metadata(checkpoint_dir, metadata)

        def load_sharded_metadata(self, checkpoint_dir):
            # megatron-core asks for it only for a strict-mismatch check (dist_checkpointing.load with a `strict`
            # that compares against the checkpoint's keys); our loads never ask for one, and compare the model
            # with compat.py instead. Refused rather than rebuilt from the checkpoint's pickled metadata unchecked.
            raise CheckpointError(f"{checkpoint_dir}: a strict key-mismatch check is not supported by the safe loader; "
                                  "load through megatron_tempnet.checkpoint (load_checkpoint, load_model_weights)")

    class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            path = os.path.join(checkpoint_dir, COMMON_STATE_FNAME)
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except FileNotFoundError:
                raise CheckpointError(f"checkpoint {checkpoint_dir} is incomplete ({COMMON_STATE_FNAME} missing); "
                                      "load another one") from None

    return SafeTorchDistLoadStrategy, SafeCommonLoadStrategy


def safe_strategies() -> tuple:
    """Fresh (sharded, common) load strategies that never unpickle arbitrary objects (module docstring)."""
    sharded, common = _strategy_classes()
    return sharded(), common()


def checkpoint_tensor_shapes(ckpt_dir: str | os.PathLike) -> Dict[str, tuple]:
    """Global shape of every tensor stored in a checkpoint, read safely from its DCP metadata."""
    sharded, _ = safe_strategies()
    return {k: tuple(v.global_shape) for k, v in sharded.load_tensors_metadata(str(ckpt_dir)).items()}


def read_checkpoint_tensors(ckpt_dir: str | os.PathLike, prefix: str = "") -> Dict[str, torch.Tensor]:
    """Every stored tensor whose key starts with `prefix`, as one full (unsharded) CPU tensor each, read
    in this process without torch.distributed (for inspection, export and tests; loading into a model goes
    through `load_checkpoint` / `load_model_weights`). Keys are megatron-core's global keys, e.g.
    "decoder.layers.self_attention.linear_qkv.weight" (layers stacked on dim 0) or
    "optimizer.state.exp_avg.tempnet.w1"."""
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    read_info(ckpt_dir)
    reader = safe_fs_reader(ckpt_dir)
    metadata = reader.read_metadata()
    out = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in metadata.state_dict_metadata.items()
           if isinstance(v, TensorStorageMetadata) and k.startswith(prefix)}
    dcp.load(out, storage_reader=reader, no_dist=True)
    return out


def safe_dist_load(sharded_state_dict: dict, ckpt_dir: Path) -> dict:
    """megatron-core's dist_checkpointing.load through the safe strategies; a mismatch is a CheckpointError."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    sharded, common = safe_strategies()
    try:
        return dist_checkpointing.load(sharded_state_dict, str(ckpt_dir), sharded_strategy=sharded,
                                       common_strategy=common)
    except (CheckpointingException, KeyError) as err:
        raise CheckpointError(
            f"cannot load {ckpt_dir}: {err}. The checkpoint does not match this model; run with the model "
            "flags it was saved with (see its tempnet_checkpoint.json)") from err
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"refusing to load {ckpt_dir}: {err}") from err
