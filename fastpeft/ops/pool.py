"""Many adapters in two tensors: the storage a serving bank hands the op (fastpeft.serving).

    A      [R, K]    rank rows of every slot: slot j's lora_A is A[start_j : start_j + r_j]
    B      [N, R]    the matching columns: slot j's lora_B is B[:, start_j : start_j + r_j]
    start  [S] int   first rank row of each slot;  rank [S] int: r_j (0 = an empty slot)
    scale  [S] fp32  s_j (alpha / r, or alpha / sqrt(r) with rsLoRA)
    magnitude, weight_norm [S, N] (optional): DoRA slots' m_j and n_j = ||W + s_j B_j A_j||_row, used where
                     ``dora`` [S] bool is set (a bank keeps n_j from the slot's load: its weights are frozen)
    max_rank         a Python int >= every r_j: the width of S [M, max_rank] the op returns

A call with a pool passes these tensors, whose shapes do not change when adapters are loaded or evicted
(only their contents do), and a row_index [M] of slot ids: under torch.compile, loading an adapter into a
warm bank is new data, not a new graph. The op turns the pool into per-slot views (one device-to-host copy
of start / rank / dora, inside the op, where torch.compile does not trace) and computes the call as a mixed
batch over those views; views of one storage reach the kernels without a copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

POOL_FIELDS = ("A", "B", "start", "rank", "scale", "magnitude", "weight_norm", "dora")
# pool.A -> {name: entry} (AdapterPool.cached); by identity (a tensor's == is elementwise)
_SHARED = WeakIdKeyDictionary()


@dataclass(frozen=True)
class AdapterPool:
    A: Tensor
    B: Tensor
    start: Tensor
    rank: Tensor
    scale: Tensor
    max_rank: int
    magnitude: Optional[Tensor] = None
    weight_norm: Optional[Tensor] = None
    dora: Optional[Tensor] = None

    @property
    def slots(self) -> int:
        return self.start.shape[0]

    def tensors(self) -> list:
        return [getattr(self, f) for f in POOL_FIELDS]

    @staticmethod
    def from_tensors(tensors, max_rank: int) -> Optional["AdapterPool"]:
        if not tensors:
            return None
        return AdapterPool(**dict(zip(POOL_FIELDS, tensors)), max_rank=int(max_rank))

    def check(self, fn: str, N: Optional[int], K: int, device) -> None:
        """ValueError naming the pool field and the shape expected and found. (A pool that passed for these
        N, K and device passes again: its shapes cannot change.)"""
        if self.__dict__.get("_checked") == (N, K, device):
            return
        self._check(fn, N, K, device)
        self.__dict__["_checked"] = (N, K, device)

    def _check(self, fn: str, N: Optional[int], K: int, device) -> None:
        R = self.A.shape[0] if self.A.dim() == 2 else None
        S = self.start.shape[0] if self.start.dim() == 1 else None
        if self.A.dim() != 2 or self.A.shape[1] != K:
            raise ValueError(f"{fn}: the adapter pool's A must be [R, K={K}]; got {tuple(self.A.shape)}")
        if self.B.dim() != 2 or self.B.shape[1] != R or (N is not None and self.B.shape[0] != N):
            raise ValueError(f"{fn}: the adapter pool's B must be [N={N}, R={R}]; got {tuple(self.B.shape)}")
        for name in ("start", "rank", "scale"):
            t = getattr(self, name)
            if t.dim() != 1 or t.shape[0] != S:
                raise ValueError(f"{fn}: the adapter pool's {name} must be [S={S}]; got {tuple(t.shape)}")
        for name in ("magnitude", "weight_norm"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (S, self.B.shape[0]):
                raise ValueError(f"{fn}: the adapter pool's {name} must be [S={S}, N={self.B.shape[0]}]; got "
                                 f"{tuple(t.shape)}")
        if (self.magnitude is None) != (self.dora is None) or (self.magnitude is None) != (self.weight_norm is None):
            raise ValueError(f"{fn}: the adapter pool's magnitude, weight_norm and dora come together")
        if self.A.device != device or self.B.device != device:
            raise ValueError(f"{fn}: the adapter pool is on {self.A.device}, x on {device}")

    def _present(self) -> tuple:
        ts = self.__dict__.get("_present_tensors")
        if ts is None:
            ts = self.__dict__["_present_tensors"] = tuple(t for t in self.tensors() if t is not None)
        return ts

    def _others(self) -> tuple:
        """The present tensors but A (A is the shared store's weak key: see :meth:`cached`)."""
        ts = self.__dict__.get("_other_tensors")
        if ts is None:
            ts = self.__dict__["_other_tensors"] = self._present()[1:]
        return ts

    def _tables_key(self) -> tuple:
        """Changes whenever a table or A / B is written in place (a bank's load). The tensors themselves
        cannot be swapped (a frozen dataclass), so their versions say it all."""
        return tuple([t._version for t in self._present()])

    def cached(self, name, build, extra: tuple = ()):
        """``build()``, kept until the pool's tables change or ``extra`` (what else the result depends on)
        differs; one entry per name. It is kept with the pool's tensors, not with this object: a layer reuses
        its pool object across forwards, but the custom op (a traced or compiled call) rebuilds one from the
        same tensors on every call, and a decode step should skip the host copies and table building either way.
        The entry lives as long as the pool's A (a weak key) and holds the other tensors, so an id is never
        reused while it is compared. Nothing in it may hold A itself (not even a view of A, whose ``_base`` is
        A): the entry would then keep its own key alive, and every pool ever cached would stay in memory; so the
        entry keeps the other tensors only, :meth:`views` slices a detached A, and builders derive from
        ``A.detach()``."""
        versions = tuple([t._version for t in self._present()])
        ts = self._others()
        extra = (extra, self.max_rank)
        store = self.__dict__.get("_store")
        if store is None:  # (one weak-dictionary lookup per pool object)
            store = _SHARED.get(self.A)
            if store is None:
                store = _SHARED[self.A] = {}
            self.__dict__["_store"] = store
        hit = store.get(name)
        if (hit is None or hit[1] != versions or hit[2] != extra
                or (hit[0] is not ts and (len(hit[0]) != len(ts) or any(a is not b for a, b in zip(hit[0], ts))))):
            hit = (ts, versions, extra, build())
            store[name] = hit
        return hit[3]

    def views(self) -> tuple:
        """Per-slot Adapters (views of A and B, no copy); one device-to-host copy of the tables (kept until
        the tables change)."""
        return self.cached("views", self._views)

    def _views(self) -> tuple:
        from .contract import Adapter

        starts, ranks = self.start.tolist(), self.rank.tolist()
        dora = self.dora.tolist() if self.dora is not None else [False] * len(starts)
        scales = self.scale.tolist()
        out = []
        A, B = self.A.detach(), self.B.detach()  # (views of A itself would keep the cache's weak key alive)
        R = A.shape[0]
        for j, (st, r) in enumerate(zip(starts, ranks)):
            if r > self.max_rank:
                raise ValueError(f"adapter pool slot {j} has rank {r}, above the pool's max_rank {self.max_rank}")
            if r and (st < 0 or r < 0 or st + r > R):  # (a slice past A would silently give the slot fewer rows)
                raise ValueError(f"adapter pool slot {j} takes rank rows [{st}, {st + r}), outside A's {R} rows")
            m = self.magnitude[j] if dora[j] else None
            n = self.weight_norm[j] if dora[j] else None
            out.append(Adapter(A[st:st + r], B[:, st:st + r], float(scales[j]), 0.0, m, n))
        return tuple(out)
