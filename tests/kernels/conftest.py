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


def pytest_collection_modifyitems(config, items):
    """`slow` kernel tests (every autotune config compiled AOT: ~200 compiles, ~10 min on 2 cold
    cores) run only when asked for: `-m slow` or FASTPEFT_SLOW=1. The default run keeps the
    kernel directory under its CI budget (a few minutes)."""
    if "slow" in (config.getoption("-m") or "") or os.environ.get("FASTPEFT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or FASTPEFT_SLOW=1")
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if "slow" in item.keywords and str(item.fspath).startswith(here):
            item.add_marker(skip)
