"""Kernel tests run Triton's CPU interpreter when there is no GPU (CI, dev machines).

TRITON_INTERPRET must be set before triton decorates the kernels (at import of fastpeft.kernels),
so it is set here, at collection time. On a CUDA machine the same tests run the compiled kernels.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def poison_outputs(monkeypatch):
    """Every output buffer the launchers allocate starts as NaN: a missed element fails the check."""
    from fastpeft.kernels import _common

    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)
    yield

