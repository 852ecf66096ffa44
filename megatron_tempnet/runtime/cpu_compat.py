"""The one place that adapts megatron-core to a CPU. megatron-core 0.16 assumes CUDA in a few spots; on a
machine without CUDA, `adapt_megatron_core_for_cpu()` makes each of them work on the CPU:

| megatron-core assumes                                      | on CPU                                        |
|------------------------------------------------------------|-----------------------------------------------|
| torch.cuda.current_device() as a device for buffers        | returns the CPU device                        |
| torch.cuda.synchronize() / current_stream() (p2p, DDP, ckpt) | no-op / a stand-in stream                     |
| device="cuda" literals (pipeline schedules, optimizer,     | a torch function mode maps them to the CPU;   |
|   clip_grads, grad buffers) and Tensor.cuda()              |   .cuda() returns the tensor itself           |
| the optimizers accept only torch.cuda.*Tensor parameters   | Tensor.type() reports CPU float tensors as    |
|                                                            |   their CUDA names to those checks            |
| the CUDA RNG tracker (model-parallel dropout seeds)        | megatron-core's no-op tracker; dropout draws  |
|                                                            |   from the CPU generator                      |
| batched p2p (batch_isend_irecv) in the pipeline schedules  | unbatched, ordered p2p (`pipeline_p2p_config`) |

The mode costs about a microsecond per torch call, so what asks for no CUDA device runs without it: the
model's forward (the trainer enters `native_torch()`) and megatron-core's backward pass (its DDP gradient
hooks are Python, four per parameter per micro-batch), wrapped here. For the same reason grad clipping gets
torch's foreach kernels in place of megatron-core's fallbacks for apex's multi-tensor ones, which loop over the
tensors in Python (and sync once per tensor for the norm); same values.

Nothing else in the project patches megatron-core; tests/test_runtime.py checks each row.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode

from .devices import use_cuda


class _CpuStream:
    """Stand-in for torch.cuda.Stream on a CPU: work is synchronous, so waiting is a no-op. A class (not a
    function), so code that uses torch.cuda.Stream in type annotations still imports."""

    def __init__(self, *_a, **_k) -> None: ...

    def wait_stream(self, *_a, **_k) -> None: ...
    def wait_event(self, *_a, **_k) -> None: ...
    def record_event(self, *_a, **_k) -> None: ...
    def synchronize(self) -> None: ...
    def __enter__(self): return self
    def __exit__(self, *exc) -> None: ...


_CUDA_TENSOR_TYPES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)  # a bare int is a CUDA ordinal


class CpuDeviceMode(TorchFunctionMode):
    """Maps CUDA device requests made by megatron-core onto the CPU (only installed without CUDA)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TENSOR_TYPES.get(name, name)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


_CPU_MODE: Optional[CpuDeviceMode] = None


def adapt_megatron_core_for_cpu() -> None:
    """Make megatron-core's CUDA assumptions hold on a CPU. Idempotent; does nothing when CUDA is present."""
    global _CPU_MODE
    if use_cuda() or _CPU_MODE is not None:
        return
    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _CpuStream()
    torch.cuda.default_stream = lambda *a, **k: _CpuStream()
    torch.cuda.Stream = _CpuStream
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    # megatron-core's tensor-parallel linears warn on every rank unless CUDA_DEVICE_MAX_CONNECTIONS=1 (advice on
    # CUDA stream ordering for overlapping all-reduces); the variable means nothing without CUDA.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _CPU_MODE = CpuDeviceMode()
    _CPU_MODE.__enter__()  # for the life of the process
    from megatron.core.pipeline_parallel import schedules

    schedules.custom_backward = _without_cpu_mode(schedules.custom_backward)
    from megatron.core.optimizer import clip_grads
    from megatron.core.utils import local_multi_tensor_l2_norm

    if clip_grads.l2_norm_impl is local_multi_tensor_l2_norm:  # neither apex nor Transformer Engine
        clip_grads.l2_norm_impl = foreach_l2_norm
        clip_grads.multi_tensor_scale_impl = foreach_scale


def foreach_l2_norm(_chunk_size, _noop_flag, tensor_lists, _per_tensor, *_args):
    """megatron-core's local_multi_tensor_l2_norm (the L2 norm of all tensors, [1] fp32) in three torch calls."""
    norms = [n for tensors in tensor_lists if tensors for n in torch._foreach_norm(tensors)]
    if not norms:
        return torch.zeros(1), None
    return torch.linalg.vector_norm(torch.stack(norms)).float().reshape(1), None


def foreach_scale(_chunk_size, _noop_flag, tensor_lists, scale):
    """megatron-core's local_multi_tensor_scale (dst = src * scale) in one or two torch calls."""
    src, dst = tensor_lists
    if all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def _without_cpu_mode(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with native_torch():
            return fn(*args, **kwargs)

    return wrapper


def native_torch():
    """Context in which torch ops bypass the CPU device mode (a no-op context on GPUs).

    The data pipeline, the model's forward (the attention mask is passed explicitly), the loss report and the
    optimizer's update never ask for a CUDA device, so the trainer runs them here; megatron-core's schedules,
    grad-norm and checkpoint code, which do ask, stay under the mode.
    """
    return torch._C.DisableTorchFunction() if _CPU_MODE is not None else contextlib.nullcontext()


def pipeline_p2p_config() -> dict:
    """TransformerConfig fields for pipeline point-to-point communication on this platform.

    gloo matches messages between two ranks in the order they are posted, with one tag. With interleaved
    pipelining on 2 ranks, the same peer is both previous and next stage, so a batched send/recv of a
    forward activation and a backward gradient of the same shape can be swapped. megatron-core's unbatched
    path posts them in an even/odd order that matches on both sides; NCCL needs no such care.
    """
    return {"batch_p2p_comm": use_cuda()}
