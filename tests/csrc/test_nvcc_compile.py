"""csrc/ compiles with nvcc for sm_80 and sm_90a, and ptxas reports no spills (CPU-only check).

The GPU-less development machines have nvcc (no cuBLAS headers), so this is how every change to the
CUDA kernels is checked before a GPU is at hand. Both targets compile in parallel to stay fast.
The GEMV kernel's optional DoRA column scale (col_scale) is compiled into every instantiation (a
runtime nullptr test, not a template flag), so the counts below cover it; the PTX test checks that it
stays a separate kernel parameter, out of the 128-byte Params (growing Params changed register
allocation and spilled, see csrc/lora_gemv.cu), and the extern "C" launcher that binding.cpp declares
must match its definition word for word (C linkage: a mismatch would link and then corrupt arguments).
"""
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fastpeft.ops.cuda_backend import nvcc_flags

CSRC = Path(__file__).resolve().parents[2] / "csrc"
KERNEL_FILES = ["lora_gemv.cu"]
# the flags of the just-in-time build (cuda_backend.nvcc_flags), so the test checks what users compile
TARGETS = {"sm_80": nvcc_flags("80"), "sm_90a": nvcc_flags("90a")}
# Instantiations: x dtype {bf16, fp16} x A/B dtype {fp32, x's} x M bound {1, 2, 4, 8}, for each kernel
# (col_scale / no col_scale is a runtime branch of the same lora_gemv_kernel, not more instantiations).
EXPECTED_KERNELS = {"lora_shrink_kernel": 16, "lora_gemv_kernel": 16}
PARAMS_BYTES = 128  # sizeof(Params) in csrc/lora_gemv.cu

ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\w+)'")
STACK = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill loads")
REGS = re.compile(r"Used (?P<regs>\d+) registers")


def find_nvcc():
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).is_file():
            return cand
    return None


def parse_ptxas(text):
    """{mangled kernel name: {"arch", "stack", "spill_stores", "spill_loads", "regs"}} from `ptxas -v`."""
    out, current = {}, None
    for line in text.splitlines():
        m = ENTRY.search(line)
        if m:
            current = m.group("name")
            out[current] = {"arch": m.group("arch")}
            continue
        if current is None:
            continue
        m = STACK.search(line)
        if m:
            out[current].update(stack=int(m.group("stack")), spill_stores=int(m.group("st")),
                                spill_loads=int(m.group("ld")))
        m = REGS.search(line)
        if m:
            out[current]["regs"] = int(m.group("regs"))
    return out


def compile_one(nvcc, src, flags, tmp_path):
    obj = tmp_path / f"{src.stem}_{abs(hash(tuple(flags)))}.o"
    cmd = [nvcc, "-c", *flags, "-Xptxas", "-v", str(src), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    return cmd, proc


def test_parse_ptxas_reads_a_known_report():
    # Guards the parser itself, so the spill test cannot pass by parsing nothing.
    text = (
        "ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'\n"
        "ptxas info    : Function properties for _Z3fooPf\n"
        "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 0 barriers\n"
    )
    assert parse_ptxas(text) == {
        "_Z3fooPf": {"arch": "sm_90a", "stack": 8, "spill_stores": 4, "spill_loads": 12, "regs": 40}
    }


@pytest.mark.parametrize("src_name", KERNEL_FILES)
def test_compiles_without_spills(src_name, tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set NVCC or put it on PATH)")
    src = CSRC / src_name
    assert src.is_file(), f"missing {src}"
    with ThreadPoolExecutor(len(TARGETS)) as pool:
        jobs = {arch: pool.submit(compile_one, nvcc, src, g, tmp_path) for arch, g in TARGETS.items()}
    for arch, job in jobs.items():
        cmd, proc = job.result()
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{log}"
        assert "warning" not in log.lower(), f"nvcc warnings for {src_name} ({arch}):\n{log}"
        kernels = parse_ptxas(log)
        assert kernels, f"no kernels found in the ptxas -v output for {src_name} ({arch}):\n{log}"
        for base, count in EXPECTED_KERNELS.items():
            found = [k for k in kernels if base in k]
            assert len(found) == count, f"{arch}: expected {count} instantiations of {base}, found {len(found)}"
        for name, info in kernels.items():
            assert info["arch"] == arch, f"{name}: compiled for {info['arch']}, expected {arch}"
            assert "spill_stores" in info and "regs" in info, f"{name} ({arch}): incomplete ptxas report {info}"
            assert info["spill_stores"] == 0 and info["spill_loads"] == 0, f"{name} ({arch}) spills: {info}"
            assert info["stack"] == 0, f"{name} ({arch}) uses a stack frame (local memory): {info}"
            # __launch_bounds__(256) caps registers at 255; more than 128 would halve occupancy
            assert info["regs"] <= 128, f"{name} ({arch}) uses {info['regs']} registers"


def launcher_signature(text):
    """The parameter list of `extern "C" int fastpeft_lora_gemv(...)` as a list of normalized parameters."""
    m = re.search(r'extern "C" int fastpeft_lora_gemv\((?P<params>[^)]*)\)', text)
    assert m, "no extern \"C\" fastpeft_lora_gemv declaration found"
    return [" ".join(p.split()) for p in m.group("params").split(",")]


def test_binding_declares_the_launcher_as_defined():
    # extern "C" names carry no parameter types, so a stale declaration in binding.cpp would still link.
    defined = launcher_signature((CSRC / "lora_gemv.cu").read_text())
    declared = launcher_signature((CSRC / "binding.cpp").read_text())
    assert declared == defined, f"binding.cpp declares\n  {declared}\nbut lora_gemv.cu defines\n  {defined}"
    assert "const float* col_scale" in defined, defined


ENTRY_PTX = re.compile(r"\.entry (?P<name>\w+)\((?P<params>[^)]*)\)")
PARAM_PTX = re.compile(r"\.param \.(?:align \d+ \.b8 \w+\[(?P<bytes>\d+)\]|(?P<type>u64|b64) \w+)")


def test_gemv_kernel_takes_col_scale_beside_params(tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set NVCC or put it on PATH)")
    ptx = tmp_path / "lora_gemv.ptx"
    flags = [f.replace("code=sm_90a", "code=compute_90a") for f in nvcc_flags("90a")]
    cmd = [nvcc, "--ptx", *flags, str(CSRC / "lora_gemv.cu"), "-o", str(ptx)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}"
    entries = {m.group("name"): PARAM_PTX.findall(m.group("params")) for m in ENTRY_PTX.finditer(ptx.read_text())}
    for base, count in EXPECTED_KERNELS.items():
        found = {k: v for k, v in entries.items() if base in k}
        assert len(found) == count, f"expected {count} PTX entries of {base}, found {len(found)}"
        # (bytes, type) per parameter: Params by value, then (GEMV only) the col_scale pointer
        want = [(str(PARAMS_BYTES), "")] + ([("", "u64")] if base == "lora_gemv_kernel" else [])
        for name, params in found.items():
            assert params == want, f"{name}: parameters {params}, expected {want}"
