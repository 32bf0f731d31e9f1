"""``lora_linear``: base linear + LoRA update in one op, as torch.library custom ops.

``fastpeft::lora_fwd`` and ``fastpeft::lora_bwd`` are opaque to torch.compile (fake impls give
shapes), so ``torch.compile(fullgraph=True)`` traces a LoRA model without graph breaks, and the
autograd formula is registered on the op (register_autograd), not in a Python autograd.Function
that dynamo would have to inline.

Saved for backward: x (a reference to the caller's tensor, so q/k/v projections of one input keep
one copy), S = (D*x) A^T [M, r], the seed, and references to the parameters. The dropout mask is
regenerated from the seed in backward. The seed is drawn from torch's default CPU generator, so
``torch.utils.checkpoint`` (which restores that RNG state before recomputing) reproduces it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import dispatch
from .torch_backend import compute_dtype

# Seeds stay in int31 so every backend can feed them to its RNG (Triton's tl.rand takes 32-bit seeds).
_SEED_HIGH = 2**31 - 1


def draw_seed() -> Tensor:
    """A fresh dropout seed (0-dim int64 CPU tensor) from torch's default CPU generator.

    A tensor, not a Python int, so that torch.compile keeps it in the graph instead of breaking on
    ``.item()``. Tests call this right after ``torch.manual_seed`` to learn the seed a call will use.
    """
    return torch.randint(0, _SEED_HIGH, (), dtype=torch.int64, device="cpu")


def _seed_int(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed.item())


def _reshape2d(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


@torch.library.custom_op("fastpeft::lora_fwd", mutates_args=())
def lora_fwd_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_A: Tensor,
                lora_B: Tensor, scale: float, dropout_p: float,
                seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    x2d = _reshape2d(x)
    name = dispatch.choose(x2d, weight, bias, lora_A, lora_B, dropout_p)
    Y, S = dispatch.get(name).lora_fwd(x2d, weight, bias, lora_A, lora_B, scale, dropout_p, _seed_int(seed))
    cdt = compute_dtype(x.dtype, lora_A, lora_B)
    # Fake impl promises these dtypes; keep real outputs identical whatever a backend returned.
    if Y.dtype != x.dtype:
        Y = Y.to(x.dtype)
    if S.dtype != cdt:
        S = S.to(cdt)
    return Y.reshape(*x.shape[:-1], lora_B.shape[0]), S


@lora_fwd_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
    M = math.prod(x.shape[:-1])
    Y = x.new_empty((*x.shape[:-1], lora_B.shape[0]))
    S = x.new_empty((M, lora_A.shape[0]), dtype=compute_dtype(x.dtype, lora_A, lora_B))
    return Y, S


@torch.library.custom_op("fastpeft::lora_bwd", mutates_args=())
def lora_bwd_op(dY: Tensor, x: Tensor, weight: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                S: Tensor, scale: float, dropout_p: float, seed: Optional[Tensor], backend: str,
                needs_dx: bool, needs_dA: bool, needs_dB: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dX, dA, dB); a grad that is not needed comes back as an empty tensor (custom ops
    cannot return None)."""
    x2d = _reshape2d(x)
    dY2 = dY.reshape(-1, dY.shape[-1])
    dX, dA, dB = dispatch.get(backend).lora_bwd(dY2, x2d, weight, lora_A, lora_B, S, scale, dropout_p,
                                                _seed_int(seed), needs_dx, needs_dA, needs_dB)
    # Each unneeded grad gets its own empty tensor: a custom op may not return one tensor twice
    # (torch.compile rejects the aliasing when two of them would share dtype).
    dX = dX.to(x.dtype).reshape(x.shape) if needs_dx else x.new_empty(0)
    dA = dA.to(lora_A.dtype) if needs_dA else lora_A.new_empty(0)
    dB = dB.to(lora_B.dtype) if needs_dB else lora_B.new_empty(0)
    return dX, dA, dB


@lora_bwd_op.register_fake
def _(dY, x, weight, lora_A, lora_B, S, scale, dropout_p, seed, backend, needs_dx, needs_dA, needs_dB):
    dX = torch.empty_like(x) if needs_dx else x.new_empty(0)
    dA = torch.empty_like(lora_A) if needs_dA else lora_A.new_empty(0)
    dB = torch.empty_like(lora_B) if needs_dB else lora_B.new_empty(0)
    return dX, dA, dB


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, dropout_p, seed = inputs
    _, S = output
    ctx.mark_non_differentiable(S)
    # The backward must run on the backend that made the mask (torch and Triton RNGs differ);
    # the choice is a pure function of these inputs and the environment, so redo it here.
    ctx.backend = dispatch.choose(_reshape2d(x), weight, bias, lora_A, lora_B, dropout_p)
    ctx.scale = scale
    ctx.dropout_p = dropout_p
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, weight, lora_A, lora_B, S, seed)


def _backward(ctx, dY, _dS):
    x, weight, lora_A, lora_B, S, seed = ctx.saved_tensors
    need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
    dX = dW = db = dA = dB = None
    if need_x or need_A or need_B:
        dX, dA, dB = torch.ops.fastpeft.lora_bwd(dY, x, weight, lora_A, lora_B, S, ctx.scale,
                                                 ctx.dropout_p, seed, ctx.backend,
                                                 bool(need_x), bool(need_A), bool(need_B))
        dX = dX if need_x else None
        dA = dA if need_A else None
        dB = dB if need_B else None
    if need_w or need_b:
        dY2 = dY.reshape(-1, dY.shape[-1])
        if need_w:
            dW = torch.mm(dY2.t(), _reshape2d(x)).to(weight.dtype)
        if need_b:
            db = dY2.sum(0).to(ctx.bias_dtype)
    return dX, dW, db, dA, dB, None, None, None


lora_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], A: Tensor, B: Tensor,
           dropout_p: float) -> None:
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"lora_linear: lora_A must be [r, K] and lora_B [N, r]; got lora_A "
                         f"{tuple(A.shape)}, lora_B {tuple(B.shape)}")
    r, K = A.shape
    N = B.shape[0]
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"lora_linear: x's last dim must be K={K} (lora_A is {tuple(A.shape)}); "
                         f"got x {tuple(x.shape)}")
    if B.shape[1] != r:
        raise ValueError(f"lora_linear: lora_B must be [N, r={r}] to match lora_A {tuple(A.shape)}; "
                         f"got {tuple(B.shape)}")
    if weight is not None:
        if tuple(weight.shape) != (N, K):
            raise ValueError(f"lora_linear: weight must be [N={N}, K={K}] (from lora_B {tuple(B.shape)}, "
                             f"lora_A {tuple(A.shape)}); got {tuple(weight.shape)}")
        if weight.dtype != x.dtype:
            raise ValueError(f"lora_linear: x ({x.dtype}) and weight ({weight.dtype}) must have the same "
                             f"dtype, as for nn.Linear; cast one of them")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"lora_linear: bias must be [N={N}]; got {tuple(bias.shape)}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"lora_linear: dropout_p must be in [0, 1]; got {dropout_p}")


def lora_linear(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_A: Tensor,
                lora_B: Tensor, scale: float, dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """``x W^T + bias + scale * dropout(x) A^T B^T`` as one op; returns [..., N] in x's dtype.

    weight None: the LoRA term only (+ bias), e.g. for a second active adapter. Dropout applies to
    the LoRA branch input only and only when ``training and dropout_p > 0``.
    """
    dropout_p = float(dropout_p)
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        # Custom ops get no autocast casts of their own. Do what autocast does for the base
        # nn.Linear: x, weight and bias in the autocast dtype. lora_A/B keep their dtype (the LoRA
        # branch runs in fp32 from fp32 adapters, at least as precise as peft's autocast bf16).
        adt = torch.get_autocast_dtype(dev)
        x, weight, bias = (
            t if t is None or not t.is_floating_point() or t.dtype == adt else t.to(adt)
            for t in (x, weight, bias))
    _check(x, weight, bias, lora_A, lora_B, dropout_p)
    if training and dropout_p > 0.0:
        seed = draw_seed()
    else:
        dropout_p, seed = 0.0, None
    Y, _ = torch.ops.fastpeft.lora_fwd(x, weight, bias, lora_A, lora_B, float(scale), dropout_p, seed)
    return Y
