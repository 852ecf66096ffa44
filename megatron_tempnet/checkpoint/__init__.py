"""Training checkpoints through megatron-core dist_checkpointing: save, resume exactly, reshard, read.

One module per job; each one's docstring says the part of the on-disk format it defines:
- folders.py          the save folder (iter_N, tracker, tempnet_checkpoint.json), finding a checkpoint,
                      atomic publish, pruning
- integrity.py        checksums.json: recorded at save, verified before a load
- safe_load.py        reading without running code from the checkpoint; full tensors without torch.distributed
- full_weights.py     a checkpoint's model weights under the TP = 1 model's keys, without torch.distributed
- state.py            what the state dict holds (model, optimizer, scheduler, RNG, common.pt values)
- compat.py           a checkpoint's model against this run's and against a TP/PP layout
- optimizer_state.py  loading optimizer state; plain <-> distributed optimizer
- save.py, load.py    save_checkpoint; load_checkpoint (resume) and load_model_weights
"""
from .compat import check_layout_fits, check_model_matches
from .folders import (FORMAT, FORMAT_VERSION, INFO_FILE, TRACKER_FILE, CheckpointError, complete_checkpoints,
                      iter_dir_name, prune_checkpoints, read_info, resolve_checkpoint)
from .full_weights import full_model_state_dict
from .integrity import CHECKSUM_FILE, checkpoint_problems, verify_checkpoint
from .load import LoadedState, check_integrity, load_checkpoint, load_model_weights
from .safe_load import checkpoint_tensor_shapes, read_checkpoint_tensors, safe_dist_load
from .save import add_save_stage_hook, save_checkpoint
from .state import model_sharded_state_dict, sharded_state_dict_metadata

__all__ = [
    "CHECKSUM_FILE", "FORMAT", "FORMAT_VERSION", "INFO_FILE", "TRACKER_FILE", "CheckpointError", "LoadedState",
    "add_save_stage_hook", "check_integrity", "check_layout_fits", "check_model_matches", "checkpoint_problems",
    "checkpoint_tensor_shapes", "complete_checkpoints", "full_model_state_dict", "iter_dir_name", "load_checkpoint", "load_model_weights",
    "model_sharded_state_dict", "prune_checkpoints", "read_checkpoint_tensors", "read_info", "resolve_checkpoint",
    "safe_dist_load", "save_checkpoint", "sharded_state_dict_metadata", "verify_checkpoint",
]
