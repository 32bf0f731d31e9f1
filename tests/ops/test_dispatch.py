"""Backend choice: automatic order, FASTPEFT_BACKEND, clear errors, fwd/bwd on the same backend."""
from __future__ import annotations

import types

import pytest
import torch

from fastpeft.ops import current_backend, dispatch, draw_seed, lora_linear, torch_backend

from _support.reference import reference, rel_err


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch


def _args(K=16, N=12, r=4):
    x = torch.randn(5, K)
    return x, torch.randn(N, K), None, torch.randn(r, K), torch.randn(N, r)


def test_auto_on_cpu_is_torch(clean_env):
    assert current_backend(torch.randn(3, 8)) == "torch"


def test_forced_torch(clean_env):
    clean_env.setenv("FASTPEFT_BACKEND", "torch")
    assert current_backend(torch.randn(3, 8)) == "torch"


def test_forced_cuda_on_cpu_tensors_raises_naming_backend_and_reason(clean_env):
    clean_env.setenv("FASTPEFT_BACKEND", "cuda")
    x, W, b, A, B = _args()
    with pytest.raises(RuntimeError, match=r"FASTPEFT_BACKEND=cuda.*cuda backend.*CUDA tensors"):
        lora_linear(x, W, b, A, B, 1.0)


def test_forced_triton_on_cpu_without_interpreter_raises(clean_env):
    clean_env.setenv("FASTPEFT_BACKEND", "triton")
    x, W, b, A, B = _args()
    with pytest.raises(RuntimeError, match=r"triton backend.*TRITON_INTERPRET=1"):
        lora_linear(x, W, b, A, B, 1.0)


def test_unknown_backend_name_raises(clean_env):
    clean_env.setenv("FASTPEFT_BACKEND", "tpu")
    with pytest.raises(RuntimeError, match=r"FASTPEFT_BACKEND='tpu' is not a fastpeft backend"):
        current_backend(torch.randn(3, 8))


def test_unimportable_backend_reason_is_reported(clean_env):
    clean_env.setattr(dispatch, "_loaded", {"triton": (None, "fastpeft.ops.triton_backend could not be "
                                                             "imported (ImportError: no triton)")})
    clean_env.setenv("FASTPEFT_BACKEND", "triton")
    clean_env.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="no triton"):
        current_backend(torch.randn(3, 8))


def test_backend_missing_protocol_is_unavailable(clean_env):
    fake = types.ModuleType("fastpeft.ops.triton_backend")
    fake.supports = lambda *a: None  # no forward / backward
    clean_env.setitem(__import__("sys").modules, "fastpeft.ops.triton_backend", fake)
    clean_env.setattr(dispatch, "_loaded", {})
    mod, reason = dispatch.load_backend("triton")
    assert mod is None and reason.endswith("does not define forward, backward")


class _Recorder(types.SimpleNamespace):
    """A stand-in triton backend that runs the torch math with a different mask RNG, and records calls.

    Its mask differs from the torch backend's for the same seed, so if forward and backward were
    dispatched to different backends the grads would be wrong.
    """

    def __init__(self, unsupported_reason=None):
        super().__init__(calls=[], reason=unsupported_reason)

    def supports(self, call):
        return self.reason

    def forward(self, call):
        self.calls.append("fwd")
        return torch_backend.forward(call.replace(seed=call.seed + 1))

    def backward(self, call, dY, S, nx, nA, nB):
        self.calls.append("bwd")
        return torch_backend.backward(call.replace(seed=call.seed + 1), dY, S, nx, nA, nB)


def test_forced_triton_with_interpreter_runs_fwd_and_bwd_on_it(clean_env):
    rec = _Recorder()
    clean_env.setattr(dispatch, "_loaded", {"triton": (rec, None)})
    clean_env.setenv("FASTPEFT_BACKEND", "triton")
    clean_env.setenv("TRITON_INTERPRET", "1")
    x, W, b, A, B = _args()
    x.requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    assert current_backend(x, W, b, A, B) == "triton"
    torch.manual_seed(9)
    seed = int(draw_seed())
    torch.manual_seed(9)
    y = lora_linear(x, W, b, A, B, 0.5, 0.3, training=True)
    y.sum().backward()
    assert rec.calls == ["fwd", "bwd"]
    # Both directions used the recorder's mask (seed + 1), not the torch backend's (seed).
    keep = torch_backend.dropout_mask(seed + 1, x.shape, 0.3, "cpu")
    yref, leaves = reference(x, W, b, A, B, 0.5, keep, 0.3)
    yref.sum().backward()
    assert rel_err(y, yref) < 1e-5
    assert rel_err(A.grad, leaves["A"].grad) < 1e-5 and rel_err(x.grad, leaves["x"].grad) < 1e-5


def test_auto_never_picks_triton_for_cpu_tensors(clean_env):
    rec = _Recorder()
    clean_env.setattr(dispatch, "_loaded", {"triton": (rec, None), "cuda": (rec, None)})
    clean_env.setenv("TRITON_INTERPRET", "1")  # interpreter alone (not forced) does not route CPU to triton
    x, W, b, A, B = _args()
    assert current_backend(x, W, b, A, B) == "torch"
    lora_linear(x, W, b, A, B, 0.5)
    assert rec.calls == []


def test_forced_backend_that_declines_names_its_reason(clean_env):
    rec = _Recorder("rank 4 not supported by this kernel")
    clean_env.setattr(dispatch, "_loaded", {"triton": (rec, None)})
    clean_env.setenv("FASTPEFT_BACKEND", "triton")
    clean_env.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="rank 4 not supported by this kernel"):
        lora_linear(*_args(), 1.0)


_TRITON_SCRIPT = """
import sys, torch
from fastpeft.ops import Adapter, Base, LoraCall, dispatch, lora_linear
sys.path.insert(0, {tests!r})
from _support.reference import run_and_compare
mod, reason = dispatch.load_backend("triton")
x, W, A, B = torch.randn(5, 33), torch.randn(17, 33) / 6, torch.randn(4, 33) / 6, torch.randn(17, 4) / 2
b = torch.randn(17)
call = LoraCall(x, Base.dense(W, b), (Adapter(A, B, 1.0),))
if mod is None or mod.supports(call) is not None:
    why = reason if mod is None else mod.supports(call)
    try:
        lora_linear(x, W, b, A, B, 1.0)
    except RuntimeError as e:
        assert "triton" in str(e) and why in str(e), str(e)
        print("UNAVAILABLE", why)
        sys.exit(0)
    raise SystemExit("forced triton backend that cannot run did not raise")
for t in (x, A, B):
    t.requires_grad_(True)
run_and_compare(x, W, b, A, B, 0.5, 0.0, 1e-4)
assert dispatch.choose(call) == "triton"
print("RAN")
"""


def test_real_triton_backend_under_interpreter():
    """The real triton backend, forced on CPU tensors under the interpreter, either matches the
    float64 reference (fwd + grads) or is refused with its own reason, never a silent fallback.

    A subprocess, because @triton.jit decides interpreter mode when a kernel module is imported, so
    TRITON_INTERPRET must be set before anything imports the kernels.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, TRITON_INTERPRET="1", FASTPEFT_BACKEND="triton")
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT.format(tests=tests)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import importlib.util

    # triton is a dependency on Linux: where it is installed the backend must really run
    expected = "RAN" if importlib.util.find_spec("triton") is not None else "UNAVAILABLE"
    assert expected in proc.stdout, proc.stdout
