"""Which pages of rank rows each slot holds: first-fit allocation of contiguous runs, and compaction.

An adapter bank's pools (one per adapted layer) have R rank rows, cut into ``n_pages = R / page_rows`` pages.
A slot holds one contiguous run of pages (the op slices slot j as ``A[start_j : start_j + r_j]``), the same run
in every layer of the bank. This module is the bookkeeping only (no tensors):

- :meth:`PageTable.first_fit` finds the lowest gap of free pages that is long enough;
- :meth:`PageTable.compact` slides every run down, in page order, so that all free pages form one gap at
  the end, and returns the moves (slot, old first page, new first page) the bank applies to every layer's
  rows. A run only ever moves down and runs keep their order, so applying the moves in the order given
  never overwrites rows not yet moved (a run's destination may overlap its own source: the caller copies
  through a temporary).
"""
from __future__ import annotations

from typing import Optional


class PageTable:
    def __init__(self, n_pages: int) -> None:
        if n_pages < 1:
            raise ValueError(f"a page table needs at least one page; got {n_pages}")
        self.n_pages = int(n_pages)
        self.runs: dict = {}  # slot -> (first page, number of pages)

    @property
    def used(self) -> int:
        return sum(n for _, n in self.runs.values())

    @property
    def free(self) -> int:
        return self.n_pages - self.used

    def _sorted(self) -> list:
        return sorted((first, n, slot) for slot, (first, n) in self.runs.items())

    def gaps(self) -> list:
        """The free runs as (first page, length), in page order."""
        out, pos = [], 0
        for first, n, _ in self._sorted():
            if first > pos:
                out.append((pos, first - pos))
            pos = first + n
        if pos < self.n_pages:
            out.append((pos, self.n_pages - pos))
        return out

    def first_fit(self, n: int) -> Optional[int]:
        """The first page of the lowest free run of at least ``n`` pages, or None."""
        return next((first for first, length in self.gaps() if length >= n), None)

    def assign(self, slot: int, first: int, n: int) -> None:
        if slot in self.runs:
            raise ValueError(f"slot {slot} already holds pages {self.runs[slot]}")
        if first < 0 or first + n > self.n_pages:
            raise ValueError(f"pages [{first}, {first + n}) are outside the table's {self.n_pages} pages")
        for other, (f, m) in self.runs.items():
            if first < f + m and f < first + n:
                raise ValueError(f"pages [{first}, {first + n}) overlap slot {other}'s [{f}, {f + m})")
        self.runs[slot] = (int(first), int(n))

    def release(self, slot: int) -> None:
        self.runs.pop(slot, None)

    def compact(self) -> list:
        """Slide every run down to close the gaps; returns the moves [(slot, old first, new first)] to apply
        in that order (runs that stay put are left out)."""
        moves, pos = [], 0
        for first, n, slot in self._sorted():
            if first != pos:
                moves.append((slot, first, pos))
                self.runs[slot] = (pos, n)
            pos += n
        return moves
