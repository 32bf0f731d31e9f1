"""Formats, QuantLinear (state_dict round trip), quantize() and its report, and bad input."""
import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.quant import QuantLinear, QuantizedWeight, formats


def _w(N, K, seed=0, dtype=torch.float32):
    return (torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


def test_int8_symmetric_per_channel():
    w = _w(16, 40)
    qw = formats.quantize_weight(w, "int8")
    assert qw.qdata.dtype == torch.int8 and qw.scales.shape == (16,)
    assert int(qw.qdata.abs().max()) == 127  # each row's absmax maps to +-127
    torch.testing.assert_close(qw.scales, w.abs().amax(1) / 127)
    err = (formats.dequantize(qw) - w).abs()
    assert (err <= qw.scales[:, None] / 2 + 1e-7).all()  # round to nearest: at most half a step


@pytest.mark.parametrize("K,gs", [(256, 128), (200, 64), (77, 32)])  # 200 % 64 and 77 % 32: partial last group
def test_int4_groupwise_asymmetric(K, gs):
    w = _w(12, K, seed=K)
    w[0, :gs] = 0  # an all-zero group
    qw = formats.quantize_weight(w, "int4", group_size=gs)
    G = -(-K // gs)
    assert qw.qdata.shape == (12, -(-K // 2)) and qw.scales.shape == (12, G) and qw.zeros.shape == (12, G)
    deq = formats.dequantize(qw)
    assert torch.equal(deq[0, :gs], torch.zeros(gs))
    # per-group bound: half a quantization step
    step = qw.scales.float().repeat_interleave(gs, dim=1)[:, :K]
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    # packing: element k of a row sits in byte k // 2, high nibble when k is even
    codes = formats.unpack_nibbles(qw.qdata, K)
    assert torch.equal(qw.qdata[:, 0], codes[:, 0] << 4 | codes[:, 1])


def test_int4_per_row_group():
    w = _w(8, 50)
    qw = formats.quantize_weight(w, "int4", group_size=-1)
    assert qw.scales.shape == (8, 1) and qw.blocksize == 50


@pytest.mark.parametrize("fmt,kw", [("nf4", {}), ("nf4", {"double_quant": True, "blocksize": 128}), ("int8", {}),
                                    ("int4", {"group_size": 32})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantlinear_state_dict_round_trip(fmt, kw, dtype, tmp_path):
    lin = nn.Linear(96, 20).to(dtype)
    q = QuantLinear.from_linear(lin, fmt, **kw)
    assert q.compute_dtype == dtype and q.dequantize().dtype == dtype
    path = tmp_path / "q.pt"
    torch.save(q.state_dict(), path)
    fresh = QuantLinear(96, 20, bias=True, fmt=fmt, compute_dtype=dtype,
                        scale_dtype=q.scales.dtype if q.scales.is_floating_point() else torch.float32,
                        **{k: v for k, v in kw.items()})
    assert not torch.equal(fresh.dequantize(), q.dequantize())
    fresh.load_state_dict(torch.load(path))
    assert torch.equal(fresh.dequantize(), q.dequantize())
    x = torch.randn(4, 96, dtype=dtype)
    assert torch.equal(fresh(x), q(x))
    torch.testing.assert_close(q(x).float(), nn.functional.linear(x.float(), q.dequantize(torch.float32),
                                                                  q.bias.float()), rtol=2e-2, atol=2e-2)
    assert not any(p.requires_grad for p in q.parameters())


def test_quantlinear_load_state_dict_shape_and_dtype_errors():
    q = QuantLinear.from_linear(nn.Linear(64, 16), "nf4")
    sd = q.state_dict()
    other = QuantLinear(64, 32, fmt="nf4")
    with pytest.raises(RuntimeError, match=r"size mismatch for weight"):
        other.load_state_dict(sd)
    bad = dict(sd, weight=sd["weight"].to(torch.int32))
    with pytest.raises(RuntimeError, match=r"dtype mismatch for weight: checkpoint has torch.int32"):
        QuantLinear(64, 16, fmt="nf4").load_state_dict(bad)


def test_packed_tensors_must_fit_the_layer():
    qw = formats.quantize_weight(_w(16, 64), "int4", group_size=32)
    with pytest.raises(ValueError, match=r"packed field 'scales' has shape \(16, 1\), expected \(16, 2\)"):
        QuantLinear.from_quantized(qw._replace(scales=qw.scales[:, :1]))
    with pytest.raises(ValueError, match=r"packed field 'qdata' has shape \(16, 16\), expected \(16, 32\)"):
        QuantLinear.from_quantized(qw._replace(qdata=qw.qdata[:, :16]))
    with pytest.raises(ValueError, match=r"packed field 'zeros' is missing"):
        QuantLinear.from_quantized(qw._replace(zeros=None))
    nq = formats.quantize_weight(_w(16, 64), "nf4")
    with pytest.raises(ValueError, match=r"'qdata' has dtype torch.int8, expected torch.uint8"):
        QuantLinear.from_quantized(nq._replace(qdata=nq.qdata.to(torch.int8)))
    layer = QuantLinear(64, 16, fmt="nf4")
    with pytest.raises(ValueError, match=r"packed weight is nf4 \[16, 32\] but this QuantLinear is nf4 \[16, 64\]"):
        layer.set_quantized(formats.quantize_weight(_w(16, 32), "nf4"))
    with pytest.raises(ValueError, match=r"bias must be \[16\]"):
        QuantLinear.from_quantized(nq, bias=torch.zeros(8))


def test_bad_format_blocksize_group_size():
    w = _w(8, 64)
    with pytest.raises(ValueError, match=r"unknown quantization format 'fp3'; expected one of nf4, int8, int4"):
        formats.quantize_weight(w, "fp3")
    with pytest.raises(ValueError, match=r"nf4 blocksize must be one of .* got 100"):
        formats.quantize_weight(w, "nf4", blocksize=100)
    with pytest.raises(ValueError, match=r"int4 group_size must be a positive int.*got 0"):
        formats.quantize_weight(w, "int4", group_size=0)
    with pytest.raises(ValueError, match=r"2-D weight .* got shape \(8, 8, 8\)"):
        formats.quantize_weight(torch.zeros(8, 8, 8), "int8")
    with pytest.raises(ValueError, match="NaN or inf"):
        formats.quantize_weight(torch.full((4, 64), float("nan")), "nf4")
    model = nn.Sequential(nn.Linear(64, 8))
    with pytest.raises(ValueError, match=r"unknown quantization format 'int3'"):
        fastpeft.quantize(model, "int3")
    with pytest.raises(ValueError, match=r"nf4 blocksize must be one of .* got 48"):
        fastpeft.quantize(model, "nf4", blocksize=48)
    with pytest.raises(ValueError, match=r"target_modules=\['nope'\] matched no nn.Linear layer"):
        fastpeft.quantize(model, "nf4", target_modules=["nope"])


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64, bias=False)
        self.lm_head = nn.Linear(64, 10)

    def forward(self, x):
        return self.lm_head(self.down(torch.relu(self.up(x))))


# packed bytes of up [128, 64] + down [64, 128]: codes + statistics (+ nf4's 16-entry fp32 code book per layer)
@pytest.mark.parametrize("fmt,expect", [("nf4", 16384 * 0.5 + 256 * 4 + 2 * 64),
                                        ("int8", 16384 + (128 + 64) * 4),
                                        ("int4", 16384 * 0.5 + (128 + 64) * (4 + 1))])  # one group per row here
def test_quantize_model_and_report(fmt, expect, capsys):
    torch.manual_seed(0)
    model = _Tiny()
    x = torch.randn(3, 64)
    ref = model(x)
    rep = fastpeft.quantize(model, fmt)
    assert rep.layers == ["up", "down"] and rep.skipped == ["lm_head"]
    assert isinstance(model.up, QuantLinear) and type(model.lm_head) is nn.Linear
    assert rep.params == 2 * 64 * 128
    assert rep.bytes_before == (2 * 64 * 128 + 128) * 4 and rep.bytes_per_param_before == pytest.approx(4.0, rel=0.01)
    assert rep.bytes_after == expect + 128 * 4  # + up's fp32 bias
    assert rep.bytes_per_param_after == pytest.approx((expect + 128 * 4) / (2 * 64 * 128))
    assert "bytes/param" in str(rep)
    assert "Quantizing to" in capsys.readouterr().err  # the tqdm bar
    torch.testing.assert_close(model(x), ref, rtol=0.2, atol=0.05)
    again = fastpeft.quantize(model, fmt)  # QuantLinear layers are left alone
    assert again.layers == []


def test_quantize_target_modules_and_double_quant():
    model = _Tiny()
    rep = fastpeft.quantize(model, "nf4", target_modules=["down"], double_quant=True, progressbar=False)
    assert rep.layers == ["down"] and isinstance(model.down, QuantLinear) and model.down.double_quant
    assert type(model.up) is nn.Linear
    assert model.down.scales.dtype == torch.uint8  # 8-bit absmax
    big = lambda: nn.Sequential(nn.Linear(1024, 256, bias=False))
    plain = fastpeft.quantize(big(), "nf4", progressbar=False).bytes_per_param_after
    dq = fastpeft.quantize(big(), "nf4", double_quant=True, progressbar=False).bytes_per_param_after
    assert plain == pytest.approx(0.5 + 4 / 64, abs=1e-3) and dq == pytest.approx(0.5 + 1 / 64, abs=5e-3)


def test_quantized_weight_fields_documented():
    # the field order is part of the op's API (kernels unpack it positionally)
    assert QuantizedWeight._fields == ("fmt", "N", "K", "qdata", "scales", "zeros", "code", "absmax2", "code2",
                                       "offset", "g_idx", "blocksize", "blocksize2")


@pytest.mark.parametrize("fmt,kw", [("nf4", {"double_quant": True}), ("int4", {"group_size": 32}), ("int8", {})])
def test_dtype_cast_keeps_packed_statistics(fmt, kw):
    model = nn.Sequential(nn.Linear(64, 16))
    fastpeft.quantize(model, fmt, progressbar=False, **kw)
    q = model[0]
    want = q.dequantize(torch.float32)
    dtypes = {n: b.dtype for n, b in q.named_buffers()}
    model.to(torch.bfloat16)
    assert {n: b.dtype for n, b in q.named_buffers()} == dtypes
    assert q.compute_dtype == torch.bfloat16 and q.bias.dtype == torch.bfloat16
    assert torch.equal(q.dequantize(), want.to(torch.bfloat16))
    assert q(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
