"""benchmarks/decode_check.py (the device check's decode step) runs end to end: its CPU smoke mode measures
every row it can on CPU and writes them, so the script a lent GPU runs has not rotted. Not a timing test."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_check.py"


def test_decode_check_cpu_smoke_writes_every_row(tmp_path):
    spec = importlib.util.spec_from_file_location("decode_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "decode.json"
    mod.main(str(out), cpu_smoke=True)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["section"], r.get("format"), r["M"]) for r in rows] == [
        ("dense", None, 1), ("dense", None, 3), ("quant", "nf4", 1), ("quant", "int4", 1), ("quant", "int8", 1),
        ("quant", "fp8", 1)]
    for r in rows:
        names = ("base", "peft", "auto") if r["section"] == "dense" else ("base_bf16", "auto", "auto_r0")
        assert all(isinstance(r[n], float) and r[n] > 0 for n in names), r
        if r["section"] == "quant":  # on CPU the bitsandbytes + peft row is the reason it is absent, not a time
            assert r["bnb_peft"] == "bitsandbytes has no such format here" or \
                r["bnb_peft"].startswith("bitsandbytes/peft not importable"), r["bnb_peft"]
        else:
            assert "bnb_peft" not in r
    assert all(r["lora_overhead"] is not None for r in rows if r["section"] == "quant")
