"""csrc/ compiles with nvcc for sm_80 and sm_90a, and ptxas reports no spills (CPU-only check).

The GPU-less development machines have nvcc (no cuBLAS headers), so this is how every change to the
CUDA kernels is checked before a GPU is at hand. Both targets compile in parallel to stay fast.
The GEMV kernel's optional DoRA column scale (col_scale) is compiled into every instantiation (a
runtime nullptr test, not a template flag), so the counts below cover it; the PTX test checks that it
stays a separate kernel parameter, out of the 128-byte Params (growing Params changed register
allocation and spilled, see csrc/lora_gemv.cu), and the extern "C" launchers that binding.cpp declares
must match their definitions word for word (C linkage: a mismatch would link and then corrupt arguments).

The quantized decode GEMV (csrc/lora_qgemv.cu, lora_qgemv_kernel) compiles in its own file: x dtype {bf16, fp16}
x format {nf4, int4, int4 with g_idx, int8, fp8} x M bound {1, 2, 4, 8}, parameters QParams and QuantView by
value; its launcher reuses lora_gemv.cu's shrink kernel through the extern "C" fastpeft_lora_shrink (declared in
lora_qgemv.cu, so that declaration is checked against the definition too).

Mixed batches (BGMV) have their own two kernels (lora_shrink_mixed_kernel, lora_gemv_mixed_kernel) taking
Params and the by-value adapter table MixedTable; the single-adapter kernels must keep the register counts
they had before (recorded below for the nvcc they were measured with).
"""
import functools
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fastpeft.ops.cuda_backend import nvcc_flags

CSRC = Path(__file__).resolve().parents[2] / "csrc"
KERNEL_FILES = ["lora_gemv.cu", "lora_qgemv.cu"]
# the flags of the just-in-time build (cuda_backend.nvcc_flags), so the test checks what users compile
TARGETS = {"sm_80": nvcc_flags("80"), "sm_90a": nvcc_flags("90a")}
# Instantiations: x dtype {bf16, fp16} x A/B dtype {fp32, x's} x M bound {1, 2, 4, 8}, for each kernel
# (col_scale / no col_scale is a runtime branch of the same lora_gemv_kernel, not more instantiations).
# No name is a substring of another, so counting by substring is exact.
EXPECTED_KERNELS = {"lora_shrink_kernel": 16, "lora_gemv_kernel": 16,
                    "lora_shrink_mixed_kernel": 16, "lora_gemv_mixed_kernel": 16}
PARAMS_BYTES = 128  # sizeof(Params) in csrc/lora_gemv.cu
MIXED_TABLE_BYTES = 400  # sizeof(MixedTable): 8 slots of 48 bytes, row_index, n (kernel parameters: <= 4 KB)
# The kernels' parameters in the PTX, (bytes, type) each: Params by value, then the col_scale pointer (single
# adapter GEMV) or the MixedTable by value (mixed kernels).
KERNEL_PARAMS = {
    "lora_shrink_kernel": [(str(PARAMS_BYTES), "")],
    "lora_gemv_kernel": [(str(PARAMS_BYTES), ""), ("", "u64")],
    "lora_shrink_mixed_kernel": [(str(PARAMS_BYTES), ""), (str(MIXED_TABLE_BYTES), "")],
    "lora_gemv_mixed_kernel": [(str(PARAMS_BYTES), ""), (str(MIXED_TABLE_BYTES), "")],
}
# The quantized GEMV: 2 x dtypes x 5 format variants (nf4, int4, int4 + g_idx, int8, fp8) x 4 M bounds.
QGEMV_KERNELS = {"lora_qgemv_kernel": 40}
FILE_KERNELS = {"lora_gemv.cu": EXPECTED_KERNELS, "lora_qgemv.cu": QGEMV_KERNELS}
QGEMV_PARAMS = [("136", ""), ("96", "")]  # sizeof(QParams), sizeof(fastpeft_qd::QuantView), by value
# extern "C" launcher -> (the file defining it, the file declaring it)
LAUNCHERS = {"fastpeft_lora_gemv": ("lora_gemv.cu", "binding.cpp"),
             "fastpeft_lora_gemv_mixed": ("lora_gemv.cu", "binding.cpp"),
             "fastpeft_lora_qgemv": ("lora_qgemv.cu", "binding.cpp"),
             "fastpeft_lora_shrink": ("lora_gemv.cu", "lora_qgemv.cu")}

# Registers of the single-adapter kernels as `ptxas -v` reported them (nvcc 13.0) before the mixed kernels were
# added beside them (sharing base_gemv / store_y, force-inlined): they must not grow. Per arch, kernel and
# "x dtype/A,B dtype", the counts for the M bounds 1, 2, 4, 8. Checked only with the nvcc they were recorded
# with (other versions allocate differently; the spill and 128-register checks still apply there).
SINGLE_REGS_NVCC = "13.0"
SINGLE_REGS = {
    ("sm_80", "lora_gemv_kernel"): {"bf16/bf16": [48, 53, 80, 70], "bf16/f32": [48, 53, 80, 73],
                                    "f16/f16": [48, 57, 80, 70], "f16/f32": [48, 57, 80, 75]},
    ("sm_90a", "lora_gemv_kernel"): {"bf16/bf16": [48, 63, 64, 74], "bf16/f32": [48, 63, 64, 76],
                                     "f16/f16": [48, 61, 76, 75], "f16/f32": [48, 61, 76, 76]},
    ("sm_80", "lora_shrink_kernel"): {"bf16/bf16": [40, 32, 48, 64], "bf16/f32": [34, 32, 48, 64],
                                      "f16/f16": [40, 32, 48, 64], "f16/f32": [34, 32, 48, 64]},
    ("sm_90a", "lora_shrink_kernel"): {"bf16/bf16": [40, 32, 48, 64], "bf16/f32": [34, 32, 48, 64],
                                       "f16/f16": [40, 32, 48, 64], "f16/f32": [34, 32, 48, 64]},
}
MT_BOUNDS = (1, 2, 4, 8)
# <digits><kernel>I<x type><A/B type: S1_ = the x type again, f = float>Li<M bound>E in the mangled names
MANGLED = re.compile(r"\d+(?P<kernel>lora_\w+?kernel)I(?P<x>13__nv_bfloat16|6__half)(?P<ab>S1_|f)Li(?P<mt>\d+)E")

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


def ptx_one(nvcc, src, tmp_path):
    """PTX for compute_90a (the kernels' parameter lists): (cmd, proc, path)."""
    ptx = tmp_path / f"{src.stem}.ptx"
    flags = [f.replace("code=sm_90a", "code=compute_90a") for f in nvcc_flags("90a")]
    cmd = [nvcc, "--ptx", *flags, str(src), "-o", str(ptx)]
    return cmd, subprocess.run(cmd, capture_output=True, text=True, timeout=240), ptx


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """get(src_name) -> ({arch: (cmd, proc)}, (cmd, proc, ptx path)): the objects of every target (`ptxas -v`) and
    the PTX, compiled in parallel on first use and shared by the tests of this module."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set NVCC or put it on PATH)")
    tmp = tmp_path_factory.mktemp("nvcc")

    @functools.lru_cache(maxsize=None)
    def get(src_name):
        src = CSRC / src_name
        assert src.is_file(), f"missing {src}"
        with ThreadPoolExecutor(len(TARGETS) + 1) as pool:
            jobs = {arch: pool.submit(compile_one, nvcc, src, g, tmp) for arch, g in TARGETS.items()}
            ptx = pool.submit(ptx_one, nvcc, src, tmp)
            return {arch: job.result() for arch, job in jobs.items()}, ptx.result()

    return get


def nvcc_release(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def kernel_key(mangled):
    """(kernel, "x dtype/A,B dtype", M bound) of a mangled kernel name, e.g. ("lora_gemv_kernel", "bf16/f32", 4)."""
    m = MANGLED.search(mangled)
    assert m, f"unexpected kernel name {mangled}"
    x = {"13__nv_bfloat16": "bf16", "6__half": "f16"}[m.group("x")]
    return m.group("kernel"), f"{x}/{x if m.group('ab') == 'S1_' else 'f32'}", int(m.group("mt"))


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
def test_compiles_without_spills(src_name, compiled):
    for arch, (cmd, proc) in compiled(src_name)[0].items():
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{log}"
        assert "warning" not in log.lower(), f"nvcc warnings for {src_name} ({arch}):\n{log}"
        kernels = parse_ptxas(log)
        assert kernels, f"no kernels found in the ptxas -v output for {src_name} ({arch}):\n{log}"
        expected = FILE_KERNELS[src_name]
        for base, count in expected.items():
            found = [k for k in kernels if base in k]
            assert len(found) == count, f"{arch}: expected {count} instantiations of {base}, found {len(found)}"
        for name, info in kernels.items():
            assert any(base in name for base in expected), f"{src_name} ({arch}): unexpected kernel {name}"
            assert info["arch"] == arch, f"{name}: compiled for {info['arch']}, expected {arch}"
            assert "spill_stores" in info and "regs" in info, f"{name} ({arch}): incomplete ptxas report {info}"
            assert info["spill_stores"] == 0 and info["spill_loads"] == 0, f"{name} ({arch}) spills: {info}"
            assert info["stack"] == 0, f"{name} ({arch}) uses a stack frame (local memory): {info}"
            # __launch_bounds__(256) caps registers at 255; more than 128 would halve occupancy
            assert info["regs"] <= 128, f"{name} ({arch}) uses {info['regs']} registers"


def test_single_adapter_kernels_keep_their_registers(compiled):
    """The mixed kernels were added beside the single-adapter ones (sharing force-inlined pieces); the
    single-adapter kernels' register counts must not grow (and there are no spills, see above)."""
    release = nvcc_release(find_nvcc())
    if release != SINGLE_REGS_NVCC:
        pytest.skip(f"register counts recorded with nvcc {SINGLE_REGS_NVCC}, this is nvcc {release}")
    for arch, (cmd, proc) in compiled("lora_gemv.cu")[0].items():
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}"
        found = {}
        for name, info in parse_ptxas(proc.stdout + proc.stderr).items():
            kernel, types, mt = kernel_key(name)
            if (arch, kernel) in SINGLE_REGS:
                found[(kernel, types, mt)] = info["regs"]
        for (a, kernel), per_types in SINGLE_REGS.items():
            if a != arch:
                continue
            for types, counts in per_types.items():
                for mt, want in zip(MT_BOUNDS, counts):
                    got = found.get((kernel, types, mt))
                    assert got is not None, f"{arch}: {kernel}<{types}, M<={mt}> not compiled"
                    assert got <= want, f"{arch}: {kernel}<{types}, M<={mt}> uses {got} registers, was {want}"


def test_kernel_key_reads_mangled_names():
    assert kernel_key("_ZN45_GLOBAL__N__63ac8a93_12_lora_gemv_cu_0801f27716lora_gemv_kernelI13__nv_bfloat16fLi4EEEv"
                      "NS_6ParamsEPKf") == ("lora_gemv_kernel", "bf16/f32", 4)
    assert kernel_key("_ZN45_GLOBAL__N__63ac8a93_12_lora_gemv_cu_0801f27724lora_shrink_mixed_kernelI6__halfS1_Li8EEEv"
                      "NS_6ParamsENS_10MixedTableE") == ("lora_shrink_mixed_kernel", "f16/f16", 8)


def launcher_signature(text, name="fastpeft_lora_gemv"):
    """The parameter list of `extern "C" int <name>(...)` as a list of normalized parameters."""
    m = re.search(r'extern "C" int ' + re.escape(name) + r'\((?P<params>[^)]*)\)', text)
    assert m, f"no extern \"C\" {name} declaration found"
    return [" ".join(p.split()) for p in m.group("params").split(",")]


def launcher_definition(text, name):
    """The parameters of the extern "C" function `name` that has a body (a definition, not a declaration)."""
    m = re.search(r'extern "C" int ' + re.escape(name) + r'\((?P<params>[^)]*)\)\s*\{', text)
    assert m, f"no extern \"C\" {name} definition found"
    return [" ".join(p.split()) for p in m.group("params").split(",")]


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_binding_declares_the_launcher_as_defined(name):
    # extern "C" names carry no parameter types, so a stale declaration would still link.
    def_file, decl_file = LAUNCHERS[name]
    defined = launcher_definition((CSRC / def_file).read_text(), name)
    declared = launcher_signature((CSRC / decl_file).read_text(), name)
    assert declared == defined, f"{decl_file} declares\n  {declared}\nbut {def_file} defines\n  {defined}"
    if name == "fastpeft_lora_gemv":
        assert "const float* col_scale" in defined, defined
    elif name == "fastpeft_lora_gemv_mixed":
        assert "const int64_t* row_index" in defined and "const void* const* a" in defined, defined
    elif name == "fastpeft_lora_qgemv":
        assert "const void* qdata" in defined and "const int* g_idx" in defined, defined
    else:
        assert "float* s" in defined and "const void* a" in defined, defined


def test_qgemv_kernels_take_params_and_quant_view_by_value(compiled):
    cmd, proc, ptx = compiled("lora_qgemv.cu")[1]
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}"
    entries = {m.group("name"): PARAM_PTX.findall(m.group("params")) for m in ENTRY_PTX.finditer(ptx.read_text())}
    assert len(entries) == QGEMV_KERNELS["lora_qgemv_kernel"], sorted(entries)
    for name, params in entries.items():
        assert "lora_qgemv_kernel" in name and params == QGEMV_PARAMS, f"{name}: parameters {params}"


ENTRY_PTX = re.compile(r"\.entry (?P<name>\w+)\((?P<params>[^)]*)\)")
PARAM_PTX = re.compile(r"\.param \.(?:align \d+ \.b8 \w+\[(?P<bytes>\d+)\]|(?P<type>u64|b64) \w+)")


def test_kernels_take_col_scale_or_table_beside_params(compiled):
    cmd, proc, ptx = compiled("lora_gemv.cu")[1]
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}"
    entries = {m.group("name"): PARAM_PTX.findall(m.group("params")) for m in ENTRY_PTX.finditer(ptx.read_text())}
    for base, count in EXPECTED_KERNELS.items():
        found = {k: v for k, v in entries.items() if base in k}
        assert len(found) == count, f"expected {count} PTX entries of {base}, found {len(found)}"
        want = KERNEL_PARAMS[base]
        for name, params in found.items():
            assert params == want, f"{name}: parameters {params}, expected {want}"
