"""The test tree itself: pytest imports test files by basename (rootdir mode, no __init__.py), so two test
files with one basename in different folders stop collection of the whole suite."""
from __future__ import annotations

import collections
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def test_test_file_basenames_are_unique():
    seen = collections.defaultdict(list)
    for root, _, files in os.walk(HERE):
        for f in files:
            if f.startswith("test_") and f.endswith(".py"):
                seen[f].append(os.path.relpath(os.path.join(root, f), HERE))
    dup = {k: v for k, v in seen.items() if len(v) > 1}
    assert not dup, f"test files sharing a basename: {dup}"
