"""Optimizer state in checkpoints: loading it into megatron-core's optimizers, and converting between the
plain and the distributed optimizer.

The distributed optimizer is saved in its "fully_reshardable" form (DISTRIB_OPTIM_SHARDING): the same
global tensors as the plain optimizer (optimizer.state.exp_avg.KEY, optimizer.state.exp_avg_sq.KEY, and
for the distributed one optimizer.state.param.KEY, its fp32 main parameters), so a checkpoint of either
kind loads into the other; only the small non-tensor part is re-nested (switch_optimizer_format).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .folders import CheckpointError
from .safe_load import checkpoint_tensor_shapes

# Sharding of the distributed optimizer's state in a checkpoint: the reshardable one (any TP/PP/DP).
DISTRIB_OPTIM_SHARDING = "fully_reshardable"


def init_distributed_optimizer_state(optimizer) -> None:
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


def main_params_from_model_weights(sd: dict, ckpt: Path) -> None:
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


def switch_optimizer_format(sd: dict, *, to_distributed: bool) -> dict:
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
