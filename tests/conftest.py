"""Root test configuration: the one slow-test rule and the tiny-model fixtures.

Slow tests: mark them ``@pytest.mark.slow``. They are skipped unless the run asks for them with
``--runslow`` or ``FASTPEFT_SLOW=1`` (e.g. ``FASTPEFT_SLOW=1 python -m pytest -q tests -m slow`` runs
only them). The default run stays within the CI budget; every slow test has a small default twin that
proves the same property on a smaller case.

Tiny models, the float64 reference and the peft twins live in tests/_support (importable as
``_support``: this file's folder is on sys.path). Nothing here imports fastpeft or transformers at
collection time: tests/kernels/conftest.py sets TRITON_INTERPRET before fastpeft.kernels is imported.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from _support.models import model_output, tiny_inputs, tiny_model


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="run the tests marked slow (or set FASTPEFT_SLOW=1)")


def run_slow(config) -> bool:
    return bool(config.getoption("--runslow")) or os.environ.get("FASTPEFT_SLOW") == "1"


def pytest_collection_modifyitems(config, items):
    if run_slow(config):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or FASTPEFT_SLOW=1")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


@pytest.fixture
def tiny():
    """Namespace: tiny.model(kind, seed=0), tiny.inputs(kind, ...), tiny.output(model, kind, inputs)."""
    return SimpleNamespace(model=tiny_model, inputs=tiny_inputs, output=model_output)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """Factory: tiny_base_dir(kind) -> local folder with a saved tiny base model (made once per session)."""
    cache = {}

    def make(kind: str = "llama") -> str:
        if kind not in cache:
            path = tmp_path_factory.mktemp(f"base_{kind}")
            tiny_model(kind).save_pretrained(str(path))
            cache[kind] = str(path)
        return cache[kind]

    return make
