"""benchmarks/bank_check.py (a serving bank's CPU decode step, side by side) runs end to end on a tiny model, and
its rows agree: the bank on the CPU kernel gives the logits of the same adapters through adapter_names, and
the grouped path the same up to fp32 summation order. Not a timing test."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bank_check.py"


def test_bank_check_quick_run_measures_every_row_and_the_rows_agree():
    spec = importlib.util.spec_from_file_location("bank_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.run(2, mod.QUICK)
    assert set(res["ms"]) == {"base", "bank", "bank_grouped", "api"}
    assert all(v > 0 for v in res["ms"].values()) and all(len(v) == 2 for v in res["samples_ms"].values())
    assert res["max_abs_diff_vs_adapter_names"]["bank"] < 1e-4
    assert res["max_abs_diff_vs_adapter_names"]["bank_grouped"] < 1e-4
