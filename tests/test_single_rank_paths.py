"""What a single tensor-parallel rank runs in place of megatron-core's Python-level machinery: torch's own
linear (models/linear.py) and cross-entropy (loss.py), torch's fused Adam on a CPU (training/optim.py).
Each gives the results of the path it replaces."""
import pytest
import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_tempnet.models import linear


def _config():
    return TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True)


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("bias", [True, False])
def test_unsharded_linear_is_torch_linear_with_megatron_results(single_rank, kind, bias):
    cls, base, kwargs = {
        "column": (linear.ColumnParallelLinear, tensor_parallel.ColumnParallelLinear, dict(gather_output=False)),
        "row": (linear.RowParallelLinear, tensor_parallel.RowParallelLinear,
                dict(input_is_parallel=True, skip_bias_add=False)),
    }[kind]
    layers = []
    for c in (cls, base):
        torch.manual_seed(0)
        layers.append(c(8, 12, config=_config(), init_method=torch.nn.init.normal_, bias=bias, **kwargs))
    x = torch.randn(5, 2, 8)
    outs, grads = [], []
    for layer in layers:
        xi = x.clone().requires_grad_()
        out, _ = layer(xi)
        out.pow(2).sum().backward()
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in layer.parameters()])
    assert "LinearWithGradAccumulation" not in type(outs[0].grad_fn).__name__  # torch's own autograd
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_cpu_adam_is_fused(single_rank):
    from helpers import tiny_config

    from megatron_tempnet.training.loop import setup_run

    _, optimizer, _ = setup_run(tiny_config("llama"))
    groups = [g for opt in getattr(optimizer, "chained_optimizers", [optimizer]) for g in opt.optimizer.param_groups]
    assert groups and all(g["fused"] for g in groups)
