"""csrc/quant_decode.cuh (the CUDA quantized decode GEMV's dequantization) against the reference
fastpeft.quant.formats.dequantize, bit for bit, on the CPU.

The header's decode functions are __host__ __device__; tests/csrc/qgemv_decode_host.cpp drives them with
g++ through both paths of csrc/lora_qgemv.cu's kernel (16-byte chunks with one scale per chunk, and one
element at a time) and writes the fp32 weight, which must equal dequantize(qw, float32) exactly: every
format, odd N, several K (chunk-aligned, with a tail, odd), nf4 double quantization (several absmax2 blocks),
int4 scale dtypes, zeros up to 16 and g_idx permutations, fp8 block shapes and every e4m3fn bit pattern.
"""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastpeft.quant import formats
from fastpeft.quant.formats import QuantizedWeight, dequantize, quantize_weight

ROOT = Path(__file__).resolve().parents[2]
HOST_SRC = Path(__file__).resolve().parent / "qgemv_decode_host.cpp"
FMT_IDS = {"nf4": 0, "int4": 1, "int8": 2, "fp8": 3}
SCALE_IDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def host_prog(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) on PATH")
    exe = tmp_path_factory.mktemp("qgemv_host") / "qgemv_decode_host"
    # -ffp-contract=off: the header's unfused double-quant multiply-add must stay unfused on the host too
    cmd = [cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
           f"-I{ROOT / 'csrc'}", str(HOST_SRC), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}"
    return exe


def _raw(t):
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def host_dequantize(exe, qw: QuantizedWeight, tmp_path):
    """(vec, scalar, used_vec): the host program's two fp32 [N, K] weights."""
    d = tmp_path / f"case_{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    fmt = qw.fmt
    q = qw.qdata.view(torch.uint8) if qw.qdata.dtype == formats.FP8_DTYPE else qw.qdata
    ldq = q.stride(0) * q.element_size() if fmt != "nf4" else 0
    lds = qw.scales.stride(0) if fmt in ("int4", "fp8") else 0
    ldz = qw.zeros.stride(0) if qw.zeros is not None else 0
    files = {"q.bin": q, "scales.bin": qw.scales, "zeros.bin": qw.zeros, "absmax2.bin": qw.absmax2,
             "gidx.bin": None if qw.g_idx is None else qw.g_idx.to(torch.int32), "code.bin": qw.code,
             "code2.bin": qw.code2}
    for name, t in files.items():
        if t is not None:
            (d / name).write_bytes(_raw(t))
    sdt = SCALE_IDS[qw.scales.dtype] if qw.scales.is_floating_point() else 0
    offset_bits = int(qw.offset.float().reshape(1).view(torch.int32).item()) & 0xFFFFFFFF if qw.offset is not None else 0
    bs2 = qw.blocksize2 if fmt in ("nf4", "fp8") else 0
    (d / "params.txt").write_text(f"{FMT_IDS[fmt]} {qw.N} {qw.K} {ldq} {lds} {ldz} {qw.blocksize} {bs2} {sdt} "
                                  f"{int(qw.double_quant)} {offset_bits}\n")
    proc = subprocess.run([str(exe), str(d)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    used_vec = proc.stdout.strip() == "vec=1"

    def load(name):
        return torch.frombuffer(bytearray((d / name).read_bytes()), dtype=torch.float32).view(qw.N, qw.K)

    return load("vec.bin"), load("scalar.bin"), used_vec


def assert_bits_equal(got, want, what):
    assert got.shape == want.shape, what
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), f"{what}: NaN positions differ"
    g, w = got.view(torch.int32)[~nan], want.view(torch.int32)[~nan]
    bad = (g != w).nonzero()
    assert bad.numel() == 0, (f"{what}: {bad.numel()} values differ, first at flat index {bad[0].item()}: "
                              f"{got[~nan][bad[0]].item()!r} != {want[~nan][bad[0]].item()!r}")


def check(exe, qw, tmp_path, what, expect_vec):
    want = dequantize(qw, torch.float32)
    vec, scalar, used_vec = host_dequantize(exe, qw, tmp_path)
    assert used_vec == expect_vec, f"{what}: vector path taken={used_vec}, expected {expect_vec}"
    assert_bits_equal(scalar, want, f"{what} (element path)")
    assert_bits_equal(vec, want, f"{what} (vector path)")


def rand_w(N, K, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g) * 3


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("N,K,blocksize,vec", [
    (5, 64, 64, True), (7, 96, 64, True),  # K % blocksize != 0: blocks straddle rows, chunks still inside
    (3, 256, 32, True), (9, 512, 128, True),
    (5, 100, 64, False), (3, 34, 32, False),  # K % 32 != 0: rows start mid-chunk, the element path
    (65, 1024, 64, True),  # 1040 blocks: double quant has 5 absmax2 blocks
])
def test_nf4(host_prog, tmp_path, N, K, blocksize, vec, double_quant):
    qw = quantize_weight(rand_w(N, K, N * K), "nf4", blocksize=blocksize, double_quant=double_quant)
    check(host_prog, qw, tmp_path, f"nf4 N={N} K={K} bs={blocksize} dq={double_quant}", vec)
    # every code in every position: random bytes instead of a quantizer's codes
    g = torch.Generator().manual_seed(K)
    q = torch.randint(0, 256, qw.qdata.shape, generator=g, dtype=torch.uint8)
    check(host_prog, qw._replace(qdata=q), tmp_path, f"nf4 random codes N={N} K={K}", vec)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N,K,group,vec", [
    (5, 128, 128, True), (7, 256, 32, True), (3, 320, 64, True),  # K % 32 == 0 and ceil(K/2) % 16 == 0
    (5, 192, -1, True),  # one group per row
    (3, 200, 64, False),  # row stride 100 bytes: not 16-byte aligned, the element path
    (5, 129, 32, False),  # odd K: the last byte's low nibble is padding
    (3, 256, 48, False),  # a group that does not hold whole 32-column chunks
])
def test_int4(host_prog, tmp_path, N, K, group, vec, scale_dtype):
    qw = quantize_weight(rand_w(N, K, K + N), "int4", group_size=group)
    qw = qw._replace(scales=qw.scales.to(scale_dtype))
    g = torch.Generator().manual_seed(K)
    # GPTQ's stored zero + 1 reaches 16: zeros are bytes, not nibbles
    qw = qw._replace(zeros=torch.randint(0, 17, qw.zeros.shape, generator=g, dtype=torch.uint8))
    what = f"int4 N={N} K={K} group={group} scales={scale_dtype}"
    check(host_prog, qw, tmp_path, what, vec)
    # act order: g_idx a permutation of the groups' columns (the vector path decodes groups per element)
    gs = K if group == -1 else group
    g_idx = (torch.arange(K) // gs)[torch.randperm(K, generator=g)].to(torch.int32)
    check(host_prog, qw._replace(g_idx=g_idx), tmp_path, f"{what} g_idx", (K + 1) // 2 % 16 == 0)


@pytest.mark.parametrize("N,K,vec", [(5, 64, True), (7, 48, True), (3, 100, False), (1, 16, True)])
def test_int8(host_prog, tmp_path, N, K, vec):
    qw = quantize_weight(rand_w(N, K, 3 * K + N), "int8")
    check(host_prog, qw, tmp_path, f"int8 N={N} K={K}", vec)
    g = torch.Generator().manual_seed(N)
    q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)  # -128 too
    check(host_prog, qw._replace(qdata=q), tmp_path, f"int8 random codes N={N} K={K}", vec)


@pytest.mark.parametrize("N,K,block,vec", [
    (130, 256, 128, True), (5, 64, None, True), (7, 96, "tensor", True), (9, 96, (3, 32), True),
    (5, 80, (1, 48), True),  # 48-wide blocks hold whole 16-column chunks
    (5, 100, 128, False),  # row stride 100 bytes: the element path
    (5, 64, (2, 20), False),  # 20-wide blocks: a chunk spans two scales
])
def test_fp8(host_prog, tmp_path, N, K, block, vec):
    qw = quantize_weight(rand_w(N, K, 5 * K + N), "fp8", fp8_block_size=block)
    what = f"fp8 N={N} K={K} block={block}"
    check(host_prog, qw, tmp_path, what, vec)
    # every e4m3fn bit pattern (subnormals, +-0, the largest values, NaN 0x7f / 0xff) at every position
    bits = torch.arange(N * K, dtype=torch.int64).remainder(256).to(torch.uint8).view(N, K)
    check(host_prog, qw._replace(qdata=bits.view(formats.FP8_DTYPE)), tmp_path, f"{what} all bit patterns", vec)


def test_host_program_detects_a_wrong_decode(host_prog, tmp_path):
    """The comparison can fail: a weight whose stored scales differ from the ones the reference sees."""
    qw = quantize_weight(rand_w(5, 64, 1), "int8")
    want = dequantize(qw._replace(scales=qw.scales * 2), torch.float32)
    vec, scalar, _ = host_dequantize(host_prog, qw, tmp_path)
    with pytest.raises(AssertionError, match="values differ"):
        assert_bits_equal(vec, want, "doubled scales")
