"""The one op contract: what a LoRA call is, how its inputs are prepared, and the one validator.

Every LoRA computation in fastpeft is one call of this shape (design: docs/ops.md):

    y = base(x) + sum_i s_i * (D_i * x) A_i^T B_i^T              (+ bias, inside base)

- the base (:class:`Base`): a dense weight W [N, K], a packed quantized weight (``fastpeft.quant``
  formats: nf4 / int8 / int4), or none (the LoRA terms alone); an optional bias [N] in every case;
- the adapters (:class:`AdapterSet`): zero or more :class:`Adapter` entries (A [r_i, K], B [N, r_i],
  scale s_i, dropout p_i). Zero entries is a plain (quantized) linear layer through the same kernels.
  An adapter may carry a ``magnitude`` m [N] (DoRA, see ops/dora.py): its output column scale is
  g = m / max(n, EPS), n = ||W + s B A||_row (``weight_norm``, detached; computed by the op when not
  given), and

      dropout off:  y = g * (x W^T + s S B^T) + bias                         (g in the GEMM epilogue)
      dropout on:   y = x W^T + (g - 1) * ((D x) W^T) + g * s S B^T + bias  (peft's second base GEMM)

  A call with a DoRA adapter holds that adapter only (a layer chains several, see the DoRA variant).
  The set's ``row_index`` (many adapters in one batch: an int tensor [M] or an ops.RowPlan, plan.py) gives
  each row ONE adapter instead of all of them, -1 = the base alone:

      y_i = base(x_i) + s_k (x_i A_k^T) B_k^T,   k = row_index[i]      (no dropout, no DoRA: inference)

  Backends compute it segment by segment (the plan's rows sorted by adapter), each adapter at its own
  rank; S is then [M, max r], row i holding its adapter's r_k values in its first columns;
- the dropout seed: one int per call; adapter i draws its mask from ``adapter_seed(seed, i)``, so
  adapter 0 uses the seed itself and every adapter gets an independent mask (peft: one nn.Dropout
  per adapter).

A backend (fastpeft.ops.<name>_backend, or any object given to dispatch.register_backend) implements

    supports(call) -> None | str             None: it can run this call; else why not (for errors)
    forward(call) -> (Y [M, N] in x's dtype, S [M, sum r_i] in compute_dtype)   S: the adapters' S_i side by side
    backward(call, dY, S, needs_dx, needs_dA, needs_dB) -> (dX | None, [dA_i | None], [dB_i | None])
    auto_ok(call) -> bool                    optional: automatic dispatch only picks it where it wins
    pool_runner(call) -> None | run          optional: run(x2d, W, bias, order) -> Y, the forward of an eager pool
                                             call kept between calls (eager.pool_call) while the pool's tensors,
                                             the plan's offsets, x's dtype and unit column stride, the settings
                                             (dispatch.settings) stay; x, W, bias and order are new each call

and sees only validated calls (:func:`validate` ran once, in :func:`fastpeft.ops.lora`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..quant.formats import QuantizedWeight, check_format
from .plan import RowPlan
from .pool import AdapterPool

# The tensor fields of a QuantizedWeight, in the order the custom ops carry them.
PACKED_FIELDS = ("qdata", "scales", "zeros", "code", "absmax2", "code2", "offset", "g_idx")

# Floor of DoRA's weight norm n in g = m / max(n, EPS): a row of W + s B A that is all zero (Llama-3.1-8B's
# o_proj has 511 zero rows of W, and B starts at zero) gives g = m / EPS, not NaN; there m is 0 as well
# (its init is n), so g = 0 and the row's output is its bias, as the zero row itself gives.
DORA_EPS = 1e-12

# Seeds stay in int31 so every backend can feed them to its RNG (Triton's tl.rand takes 32-bit seeds).
SEED_HIGH = 2**31 - 1
# Odd 31-bit step between the seeds of consecutive adapters of one call (a Weyl sequence: distinct
# for the first 2**31 - 1 adapters, and far apart, so Philox and torch Generators see unrelated keys).
_SEED_STEP = 0x5851F42D


def dora_column_scale(magnitude: Tensor, norm: Tensor) -> Tensor:
    """DoRA's g = m / max(n, EPS) [N] in fp32 (float64 if m or n is); differentiable in m (n is a detached
    norm). The one place this formula is written."""
    acc = torch.promote_types(torch.float32, torch.promote_types(magnitude.dtype, norm.dtype))
    return magnitude.to(acc) / norm.to(acc).clamp_min(DORA_EPS)


def adapter_seed(seed: int, i: int) -> int:
    """Dropout seed of adapter ``i`` of a call drawn with ``seed`` (adapter 0: the seed itself)."""
    return (int(seed) + i * _SEED_STEP) % SEED_HIGH


def compute_dtype(x_dtype: torch.dtype, *adapter_dtypes: torch.dtype) -> torch.dtype:
    """dtype of the LoRA branch (S, dS, dA, dB): at least fp32, float64 when anything is float64.

    fp16/bf16 x with fp32 adapters (peft's default) gets the adapter math in fp32, like peft does
    by casting x to lora_A's dtype.
    """
    return _promoted(torch.float32, x_dtype, *adapter_dtypes)


@functools.lru_cache(maxsize=None)
def _promoted(*dtypes: torch.dtype) -> torch.dtype:
    # torch.promote_types is a dispatched op: cached, a call's dtype costs one dict lookup
    dt = dtypes[0]
    for d in dtypes[1:]:
        dt = torch.promote_types(dt, d)
    return dt


@dataclass(frozen=True)
class Base:
    """The base layer of a call. Build with :meth:`dense`, :meth:`quantized` or :meth:`none`."""

    weight: Optional[Tensor] = None             # dense [N, K] (any strides: Conv1D passes W^T as a view)
    packed: Optional[QuantizedWeight] = None    # quantized [N, K]; never materialized by a fused kernel
    bias: Optional[Tensor] = None               # [N]

    @staticmethod
    def dense(weight: Tensor, bias: Optional[Tensor] = None) -> "Base":
        return Base(weight=weight, bias=bias)

    @staticmethod
    def quantized(packed: QuantizedWeight, bias: Optional[Tensor] = None) -> "Base":
        return Base(packed=packed, bias=bias)

    @staticmethod
    def none(bias: Optional[Tensor] = None) -> "Base":
        return Base(bias=bias)

    @property
    def kind(self) -> str:
        """One of "dense", "quant" or "none"."""
        return "dense" if self.weight is not None else "quant" if self.packed is not None else "none"


@dataclass(frozen=True)
class Adapter:
    """One LoRA adapter of a call: A [r, K], B [N, r], scale s, dropout probability p on its input."""

    A: Tensor
    B: Tensor
    scale: float
    dropout_p: float = 0.0
    magnitude: Optional[Tensor] = None    # [N]: DoRA's magnitude m (the column scale g = m / ||W + s B A||_row)
    weight_norm: Optional[Tensor] = None  # [N] fp32: DoRA's n = ||W + s B A||_row, detached (None: the op computes it)

    @property
    def r(self) -> int:
        return self.A.shape[0]


@dataclass(frozen=True)
class AdapterSet:
    """The adapters of a call, applied together (their terms add up in one output write)."""

    adapters: tuple = ()
    row_index: Optional[object] = None   # [M] int tensor or RowPlan: adapter per row, -1 = base only (mixed batch)
    pool: Optional[AdapterPool] = None   # instead of ``adapters``: a bank's storage (pool.py); row_index = slot ids

    def __post_init__(self):
        object.__setattr__(self, "adapters", tuple(self.adapters))


@dataclass(frozen=True)
class LoraCall:
    """A validated, prepared call as the backends see it: x is 2-D [M, K]."""

    x: Tensor
    base: Base
    adapters: tuple
    seed: int = 0
    plan: Optional[RowPlan] = None     # a mixed batch: which adapter each row takes (plan.py)
    pool: Optional[AdapterPool] = None  # the storage ``adapters`` are views of, for a pool call (pool.py)

    @property
    def M(self) -> int:
        return self.x.shape[0]

    @property
    def K(self) -> int:
        return self.x.shape[1]

    @property
    def N(self) -> int:
        return out_features(self.base, self.adapters)

    @property
    def r_total(self) -> int:
        """Columns of S: every adapter's side by side, or for a mixed batch the largest rank."""
        return s_columns([a.r for a in self.adapters], self.plan is not None)

    def seeds(self) -> list:
        return [adapter_seed(self.seed, i) for i in range(len(self.adapters))]

    def r_slices(self) -> list:
        """Column slice of S (and dS) that belongs to each adapter."""
        out, start = [], 0
        for a in self.adapters:
            out.append(slice(start, start + a.r))
            start += a.r
        return out

    def compute_dtype(self) -> torch.dtype:
        if self.pool is not None:  # every adapter is a view of the pool's A and B
            return compute_dtype(self.x.dtype, self.pool.A.dtype, self.pool.B.dtype)
        ads = self.adapters
        if len(ads) == 1:  # the common call, without building a generator
            a = ads[0]
            return _promoted(torch.float32, self.x.dtype, a.A.dtype, a.B.dtype)
        return compute_dtype(self.x.dtype, *(t.dtype for a in ads for t in (a.A, a.B)))

    @property
    def is_dora(self) -> bool:
        """A DoRA call: one adapter, with a magnitude (validate() allows no other shape)."""
        return len(self.adapters) == 1 and self.adapters[0].magnitude is not None

    def col_scale(self) -> Optional[Tensor]:
        """DoRA's output column scale g = m / max(n, EPS) [N] fp32 (float64 for float64 inputs), or None for a plain LoRA call."""
        if not self.is_dora:
            return None
        a = self.adapters[0]
        return dora_column_scale(a.magnitude.detach(), a.weight_norm)

    def describe(self) -> str:
        """Names the call for error messages, e.g. "lora call (int4 weight [24, 80], x (3, 80) ...)"."""
        kind = self.base.kind
        base = ("no base weight" if kind == "none" else
                f"{'dense' if kind == 'dense' else self.base.packed.fmt} weight [{self.N}, {self.K}]")
        ranks = ", ".join(str(a.r) for a in self.adapters) or "none"
        ps = sorted({a.dropout_p for a in self.adapters}) or [0.0]
        return (f"lora call ({base}, x {tuple(self.x.shape)} {self.x.dtype} on {self.x.device}, adapter ranks "
                f"{ranks}, dropout_p {', '.join(map(str, ps))})")

    def replace(self, **changes) -> "LoraCall":
        return dataclasses.replace(self, **changes)


def s_columns(ranks: Sequence[int], mixed: bool) -> int:
    """Width of S: sum of the ranks, or the largest for a mixed batch (row i uses its adapter's r_k)."""
    return max(ranks, default=0) if mixed else sum(ranks)


def out_features(base: Base, adapters: Sequence[Adapter]) -> int:
    if base.weight is not None:
        return base.weight.shape[0]
    if base.packed is not None:
        return base.packed.N
    if adapters:
        return adapters[0].B.shape[0]
    return base.bias.shape[0] if base.bias is not None else 0


# -- input preparation: the one place where inputs are cast ------------------------------------------
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _dtensor_type():
    """torch.distributed.tensor.DTensor, imported on first need (None where torch.distributed is absent)."""
    global _DTENSOR
    if _DTENSOR is False:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover - torch built without distributed
            DTensor = None
        _DTENSOR = DTensor
    return _DTENSOR


_DTENSOR = False


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor. The common case (plain tensors and parameters, None) answers without
    importing torch.distributed."""
    if t is None or type(t) in _PLAIN_TYPES:
        return False
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def _local(t: Tensor, name: str) -> Tensor:
    """A DTensor input as the plain tensor the op computes with, where that is correct; else a clear error.

    - every placement Replicate: the local tensor (``to_local``: same values; its gradient comes back as
      a Replicate DTensor, as DTensor autograd defines);
    - sharded / partial and no gradient needed (a frozen base weight, a packed quantized field, or
      grad mode off): the full tensor (``full_tensor``: an all-gather, so every rank runs this call);
    - sharded / partial and a gradient needed: refused. The gathered tensor's gradient would come
      back as this rank's chunk of this rank's gradient, never reduced across ranks, and data-parallel
      training would silently diverge.
    """
    from torch.distributed.tensor import Replicate

    placements = tuple(t.placements)
    if all(isinstance(p, Replicate) for p in placements):
        return t.to_local()
    needs_grad = t.requires_grad and torch.is_grad_enabled()
    if not needs_grad:
        return t.full_tensor()
    raise ValueError(
        f"fastpeft.ops.lora: {name} is a DTensor with placements {placements} over a device mesh of "
        f"{t.device_mesh.size()} ranks, and it needs a gradient. FSDP2 (fully_shard) gathers a module's "
        f"parameters in that module's forward pre-hook, and a LoRA layer reads lora_A / lora_B (and its base "
        f"weight) in its own forward without calling their modules. Apply fully_shard to the LoRA layer or a "
        f"module that contains it (e.g. each transformer block, then the root model), not to lora_A, lora_B or "
        f"base_layer alone."
    )


def _local_packed(packed: QuantizedWeight) -> QuantizedWeight:
    changed = {f: _local(getattr(packed, f), f"the packed weight's {f}") for f in PACKED_FIELDS
               if is_dtensor(getattr(packed, f))}
    return packed._replace(**changed) if changed else packed


def prepare(x: Tensor, base: Base, adapters: "AdapterSet" = None) -> tuple:
    """(x, base, adapters) as the op computes them (``adapters`` None: an empty set).

    DTensors (FSDP2 / tensor-parallel inputs) become the plain tensors the kernels take where that is
    correct, see :func:`_local`: a Replicate DTensor its local tensor, a sharded one that needs no
    gradient its full tensor; a sharded one that needs a gradient is refused with a ValueError naming
    it. Under FSDP2 applied to the blocks that contain the LoRA layers, every input is already a plain
    tensor here (the block's pre-forward hook unsharded them). x itself is refused as a DTensor: a
    DTensor activation means tensor / sequence parallelism, whose output layout the op cannot produce.

    Under torch.autocast: x, the dense weight and the bias in the autocast dtype, as autocast casts
    an nn.Linear's inputs (custom ops get no autocast casts of their own). Adapters keep their dtype:
    the LoRA branch runs in fp32 from fp32 adapters, at least as precise as peft's autocast bf16.
    A quantized base is dequantized into x's dtype, so its bias follows x's dtype too.
    """
    if adapters is None:
        adapters = AdapterSet()
    if is_dtensor(x):
        raise ValueError(
            f"fastpeft.ops.lora: x is a DTensor with placements {tuple(x.placements)}: DTensor activations "
            f"(tensor or sequence parallelism) are not supported. Data-parallel engines (DDP, FSDP1, FSDP2, "
            f"DeepSpeed ZeRO) pass plain activations; call the op with x.to_local() or x.full_tensor()."
        )
    weight, bias, packed = base.weight, base.bias, base.packed
    if is_dtensor(weight):
        weight = _local(weight, "the base weight")
    if is_dtensor(bias):
        bias = _local(bias, "the bias")
    if packed is not None:
        packed = _local_packed(packed)
    ads = adapters.adapters
    if any(is_dtensor(t) for a in ads for t in (a.A, a.B, a.magnitude, a.weight_norm)):
        ads = tuple(dataclasses.replace(
            a, A=_local(a.A, f"lora_A{_which(ads, i)}") if is_dtensor(a.A) else a.A,
            B=_local(a.B, f"lora_B{_which(ads, i)}") if is_dtensor(a.B) else a.B,
            magnitude=_local(a.magnitude, f"magnitude{_which(ads, i)}") if is_dtensor(a.magnitude) else a.magnitude,
            weight_norm=_local(a.weight_norm, f"weight_norm{_which(ads, i)}") if is_dtensor(a.weight_norm)
            else a.weight_norm)
            for i, a in enumerate(ads))
        adapters = AdapterSet(ads, adapters.row_index)
    if is_dtensor(adapters.row_index):
        adapters = AdapterSet(adapters.adapters, _local(adapters.row_index, "row_index"))
    if isinstance(adapters.row_index, Tensor) and adapters.pool is None:
        # one sort and one sync; a caller may pass a plan it reuses (a pool call sorts inside the op)
        adapters = AdapterSet(adapters.adapters, RowPlan.build(adapters.row_index, len(adapters.adapters)))
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        adt = torch.get_autocast_dtype(dev)
        x, weight, bias = (t if t is None or not t.is_floating_point() or t.dtype == adt else t.to(adt)
                           for t in (x, weight, bias))
    if packed is not None and bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if weight is not base.weight or bias is not base.bias or packed is not base.packed:
        base = Base(weight=weight, packed=packed, bias=bias)
    return x, base, adapters


# -- the one validator ------------------------------------------------------------------------------
def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def _which(ads, i: int) -> str:
    return "" if len(ads) == 1 else f" (adapter {i})"


def validate(fn: str, x: Tensor, base: Base, adapters: AdapterSet) -> None:
    """ValueError naming the tensor and the shape or dtype expected and found (``fn``: the caller)."""
    if base.weight is not None and base.packed is not None:
        raise ValueError(f"{fn}: a base has a dense weight or a packed weight, not both")
    if x.dim() < 1:
        raise ValueError(f"{fn}: x must have a feature dimension [..., K]; got a 0-d tensor")
    if not x.is_floating_point():
        raise ValueError(f"{fn}: x must be a float tensor; got {x.dtype}")
    if adapters.pool is not None:
        _validate_pool(fn, x, base, adapters)
        return
    if base.kind == "none" and not adapters.adapters:
        raise ValueError(f"{fn}: nothing to compute: no base weight and no adapters")
    ads = adapters.adapters
    for i, a in enumerate(ads):
        if a.A.dim() != 2 or a.B.dim() != 2:
            raise ValueError(f"{fn}: lora_A must be [r, K] and lora_B [N, r]{_which(ads, i)}; got lora_A "
                             f"{_shape(a.A)}, lora_B {_shape(a.B)}")
    # N and K: the packed weight's, else the first adapter's (so a wrong dense weight is the one named)
    if base.packed is not None:
        check_format(base.packed.fmt)
        N, K, src = base.packed.N, base.packed.K, f"quantized weight is [N={base.packed.N}, K={base.packed.K}]"
    elif ads:
        N, K, src = ads[0].B.shape[0], ads[0].A.shape[1], f"lora_A is {_shape(ads[0].A)}"
    else:
        if base.weight.dim() != 2:
            raise ValueError(f"{fn}: weight must be 2-D [N, K]; got {_shape(base.weight)}")
        (N, K), src = base.weight.shape, f"weight is {_shape(base.weight)}"
    if x.shape[-1] != K:
        raise ValueError(f"{fn}: x's last dim must be K={K}; got x {_shape(x)} ({src})")
    for i, a in enumerate(ads):
        which, r = _which(ads, i), a.A.shape[0]
        if a.B.shape[1] != r:
            raise ValueError(f"{fn}: lora_B must be [N, r={r}] to match lora_A {_shape(a.A)}{which}; got "
                             f"{_shape(a.B)}")
        if _shape(a.A) != (r, K) or a.B.shape[0] != N:
            raise ValueError(f"{fn}: {src} but lora_A is {_shape(a.A)} and lora_B {_shape(a.B)}{which}; "
                             f"expected lora_A [r, K={K}] and lora_B [N={N}, r]")
        if not (a.A.is_floating_point() and a.B.is_floating_point()):
            raise ValueError(f"{fn}: lora_A and lora_B must be float tensors{which}; got {a.A.dtype}, {a.B.dtype}")
        if not 0.0 <= float(a.dropout_p) <= 1.0:
            raise ValueError(f"{fn}: dropout_p must be in [0, 1]{which}; got {a.dropout_p}")
    dora = [i for i, a in enumerate(ads) if a.magnitude is not None]
    if dora:
        if len(ads) > 1:
            raise ValueError(f"{fn}: a call with a DoRA adapter (a magnitude, adapter {dora[0]}) holds that adapter "
                             f"only; got {len(ads)} adapters. Chain the calls (peft applies DoRA adapters one after "
                             f"the other; see fastpeft.tuners.lora.variants.dora)")
        if base.kind == "none":
            raise ValueError(f"{fn}: a DoRA adapter (magnitude given) needs the base weight for its norm "
                             f"||W + s B A||; got no base weight")
        m, n = ads[0].magnitude, ads[0].weight_norm
        if _shape(m) != (N,) or not m.is_floating_point():
            raise ValueError(f"{fn}: the DoRA magnitude must be a float [N={N}]; got {_shape(m)} {m.dtype}")
        if n is not None and (_shape(n) != (N,) or not n.is_floating_point()):
            raise ValueError(f"{fn}: the DoRA weight_norm must be a float [N={N}]; got {_shape(n)} {n.dtype}")
    plan = adapters.row_index
    if plan is not None:
        M = math.prod(x.shape[:-1])
        if plan.n_adapters != len(ads):
            raise ValueError(f"{fn}: the row plan is for {plan.n_adapters} adapters; the call has {len(ads)}")
        if plan.M != M:
            raise ValueError(f"{fn}: row_index must have one entry per row of x: expected [M={M}] (x "
                             f"{_shape(x)}), got [{plan.M}]")
        if plan.row_index.device != x.device:
            raise ValueError(f"{fn}: row_index is on {plan.row_index.device}, x on {x.device}")
        if dora:
            raise ValueError(f"{fn}: a mixed batch (row_index) with a DoRA adapter is not supported (peft "
                             f"refuses DoRA with adapter_names too)")
    if base.weight is not None:
        if _shape(base.weight) != (N, K):
            raise ValueError(f"{fn}: weight must be [N={N}, K={K}] (from lora_B {_shape(ads[0].B)}, lora_A "
                             f"{_shape(ads[0].A)}); got {_shape(base.weight)}")
        if base.weight.dtype != x.dtype:
            raise ValueError(f"{fn}: x ({x.dtype}) and weight ({base.weight.dtype}) must have the same dtype, "
                             f"as for nn.Linear; cast one of them")
    if base.bias is not None and _shape(base.bias) != (N,):
        raise ValueError(f"{fn}: bias must be [N={N}]; got {_shape(base.bias)}")


def _validate_pool(fn: str, x: Tensor, base: Base, adapters: AdapterSet) -> None:
    """A call on an adapter pool: no separate adapters, a row_index tensor of slot ids, the pool's shapes."""
    if adapters.adapters:
        raise ValueError(f"{fn}: a call has an adapter pool or a list of adapters, not both")
    idx = adapters.row_index
    M = math.prod(x.shape[:-1])
    if isinstance(idx, RowPlan):
        if idx.M != M or idx.n_adapters != adapters.pool.slots:
            raise ValueError(f"{fn}: the row plan is for {idx.M} rows and {idx.n_adapters} slots; the call has "
                             f"{M} rows and a pool of {adapters.pool.slots} slots")
        idx = idx.row_index
    if not isinstance(idx, Tensor) or idx.dim() != 1 or idx.shape[0] != M or idx.is_floating_point():
        raise ValueError(f"{fn}: a call on an adapter pool needs row_index, an int tensor [M={M}] of slot ids "
                         f"(-1 = base only); got {None if idx is None else (type(idx).__name__, getattr(idx, 'shape', None))}")
    if base.weight is not None and base.weight.dtype != x.dtype:
        raise ValueError(f"{fn}: x ({x.dtype}) and weight ({base.weight.dtype}) must have the same dtype")
    N = base.weight.shape[0] if base.weight is not None else base.packed.N if base.packed is not None else None
    adapters.pool.check(fn, N, x.shape[-1], x.device)
