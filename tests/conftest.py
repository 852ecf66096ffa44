"""Shared fixtures. Single-process tests that need megatron-core's process groups use `single_rank`;
multi-rank tests spawn real gloo process groups through helpers.spawn()."""
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")

from helpers import free_port  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def single_rank():
    """A 1-rank gloo process group with megatron-core's model-parallel state (TP = PP = 1)."""
    from megatron_tempnet import runtime

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    runtime.init_distributed()
    yield
    runtime.destroy_distributed()
