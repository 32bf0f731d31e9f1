"""GPTQ and AWQ imports. The packers here are written from the published format descriptions (not
from any GPTQ/AWQ code): the import must reproduce their reference dequantization exactly."""
import pytest
import torch

from fastpeft.quant import QuantLinear, from_awq, from_gptq


def _to_int32(x64: torch.Tensor) -> torch.Tensor:
    # 8 nibbles fill all 32 bits; wrap the unsigned value into int32 two's complement
    return torch.where(x64 >= 2**31, x64 - 2**32, x64).to(torch.int32)


def pack_gptq(q_kn, zeros_gn):
    """GPTQ v1: qweight [K/8, N] packed along K (row k at bits 4*(k%8)); qzeros [G, N/8] packed along N,
    storing zero - 1 in 4 bits."""
    K, N = q_kn.shape
    q = q_kn.to(torch.int64).view(K // 8, 8, N)
    qweight = sum(q[:, i, :] << (4 * i) for i in range(8))
    zs = ((zeros_gn.to(torch.int64) - 1) & 0xF).view(zeros_gn.shape[0], N // 8, 8)
    qzeros = sum(zs[:, :, i] << (4 * i) for i in range(8))
    return _to_int32(qweight), _to_int32(qzeros)


def ref_gptq(qweight, qzeros, scales, g_idx):
    """Reference dequantization straight from the description: W[n, k] = s[g, n] * (q[k, n] - (zs[g, n] + 1))."""
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    W = torch.empty(N, K, dtype=scales.dtype)
    for k in range(K):
        g = int(g_idx[k])
        q = (qweight[k // 8].to(torch.int64) >> (4 * (k % 8))) & 0xF
        zn = torch.tensor([(int(qzeros[g, n // 8]) >> (4 * (n % 8))) & 0xF for n in range(N)]) + 1
        W[:, k] = scales[g] * (q - zn).to(scales.dtype)  # fp16 arithmetic, as GPTQ's torch path does
    return W


AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i holds column AWQ_PACK_ORDER[i] of each group of 8


def pack_awq(t_rn):
    R, N = t_rn.shape
    t = t_rn.to(torch.int64).view(R, N // 8, 8)
    return _to_int32(sum(t[:, :, AWQ_PACK_ORDER[i]] << (4 * i) for i in range(8)))


def ref_awq(qweight, qzeros, scales, group_size):
    K, N = qweight.shape[0], qweight.shape[1] * 8

    def unpack(p):  # [R, N/8] -> [R, N]
        out = torch.empty(p.shape[0], N, dtype=torch.int64)
        for i in range(8):
            out[:, AWQ_PACK_ORDER[i]::8] = (p.to(torch.int64) >> (4 * i)) & 0xF
        return out

    q, z = unpack(qweight), unpack(qzeros)
    g = torch.arange(K) // group_size
    return (scales[g] * (q - z[g]).to(scales.dtype)).t()


def _rand(K, N, G, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (K, N), generator=g)
    z = torch.randint(0, 16, (G, N), generator=g)
    z[0, :3] = 0  # zero point 0: stored as -1 -> nibble 15 -> read back as 16 (the v1 convention)
    s = (torch.rand(G, N, generator=g) * 0.01 + 1e-3).half()
    return q, z, s


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_import_reproduces_reference(act_order):
    K, N, gs = 64, 24, 16
    G = K // gs
    q, z, s = _rand(K, N, G, seed=1)
    g_idx = torch.arange(K) // gs
    if act_order:  # desc_act: columns are visited in a permuted order, so groups are scattered over K
        g_idx = g_idx[torch.randperm(K, generator=torch.Generator().manual_seed(3))]
    qweight, qzeros = pack_gptq(q, z)
    bias = torch.randn(N).half()
    layer = from_gptq(qweight, qzeros, s, g_idx.to(torch.int32), bias=bias)
    assert isinstance(layer, QuantLinear) and layer.fmt == "int4" and layer.act_order == act_order
    ref = ref_gptq(qweight, qzeros, s, g_idx)
    assert layer.dequantize().dtype == torch.float16
    assert torch.equal(layer.dequantize(), ref)
    assert int(layer.zeros.max()) == 16  # the overflowed zero survived
    x = torch.randn(3, K).half()
    torch.testing.assert_close(layer(x.float()), x.float() @ ref.float().t() + bias.float(), rtol=1e-3, atol=1e-3)
    sd = layer.state_dict()
    fresh = QuantLinear(K, N, bias=True, fmt="int4", group_size=gs, act_order=act_order,
                        compute_dtype=torch.float16, scale_dtype=torch.float16)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.dequantize(), ref)


@pytest.mark.parametrize("group_size", [16, 32])
def test_awq_import_reproduces_reference(group_size):
    K, N = 64, 32
    G = K // group_size
    q, z, s = _rand(K, N, G, seed=2)
    z = z.clamp(max=15)  # AWQ stores the zero itself
    qweight, qzeros = pack_awq(q), pack_awq(z)
    layer = from_awq(qweight, qzeros, s, group_size=group_size)
    assert torch.equal(layer.dequantize(), ref_awq(qweight, qzeros, s, group_size))
    g = torch.arange(K) // group_size
    direct = (s[g] * (q - z[g]).half()).t()  # the weight the codes stand for, no packing involved
    assert torch.equal(layer.dequantize(), direct)
    # the interleave matters: codes packed in plain nibble order import as a different weight
    plain = lambda t: _to_int32(sum(t.to(torch.int64).view(t.shape[0], -1, 8)[:, :, i] << (4 * i) for i in range(8)))
    assert not torch.equal(from_awq(plain(q), plain(z), s, group_size=group_size).dequantize(), direct)


def test_importers_reject_bad_shapes():
    K, N, gs = 64, 24, 16
    q, z, s = _rand(K, N, K // gs, seed=4)
    qweight, qzeros = pack_gptq(q, z)
    with pytest.raises(ValueError, match=r"qzeros has shape \(4, 2\), expected \(4, 3\)"):
        from_gptq(qweight, qzeros[:, :2], s)
    with pytest.raises(ValueError, match=r"scales must be \[G, N=24\]"):
        from_gptq(qweight, qzeros, s[:, :8])
    with pytest.raises(ValueError, match="only 4-bit"):
        from_gptq(qweight, qzeros, s, bits=8)
    with pytest.raises(ValueError, match=r"g_idx values must be in \[0, 4\)"):
        from_gptq(qweight, qzeros, s, torch.full((K,), 7, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"g_idx has shape \(32,\), expected \(64,\)"):
        from_gptq(qweight, qzeros, s, torch.zeros(32, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        from_gptq(qweight.to(torch.int64), qzeros, s)
    aq = pack_awq(q)
    with pytest.raises(ValueError, match=r"scales has shape \(4, 24\), expected \(2, 24\)"):
        from_awq(aq, pack_awq(z), s, group_size=32)
