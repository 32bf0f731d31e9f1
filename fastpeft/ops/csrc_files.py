"""Where the C++ / CUDA sources (csrc/) are: a source checkout (editable install) keeps them next to the package,
a wheel ships them as fastpeft/csrc (setup.py). Both just-in-time builds look here: cuda_backend.py (the CUDA
kernels) and cpu_mixed.py (the CPU mixed-batch kernel)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence


def csrc_dir(files: Sequence[str]) -> Optional[Path]:
    """The csrc folder holding every one of ``files``, or None."""
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / "csrc", here.parents[1] / "csrc"):
        if all((cand / f).is_file() for f in files):
            return cand
    return None
