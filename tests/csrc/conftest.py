"""Fixtures of the csrc tests."""
import pytest
import torch

from fastpeft.ops import cuda_backend


@pytest.fixture(scope="module")
def module():
    """The built csrc extension (the just-in-time build on first use); only `cuda`-marked tests take it."""
    mod = cuda_backend.load(torch.device("cuda"))
    assert not isinstance(mod, str), mod
    return mod
