"""nf4 against bitsandbytes on CPU: same codes, absmax and nested statistics from quantize_4bit, and a
dequantization bit-identical to bitsandbytes.functional.dequantize_4bit; import of a bnb Linear4bit."""
import pytest
import torch

from fastpeft.quant import QuantLinear, formats, from_bnb, import_bnb

bnb = pytest.importorskip("bitsandbytes")
BF = bnb.functional


def _weights(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.02
    # outliers and an exact-zero block, so absmax ranges widely and the zero-block path is covered
    w.view(-1)[7::501] *= 40
    w.view(-1)[:64] = 0
    return w.to(dtype)


def test_code_books_are_bnbs():
    _, st = BF.quantize_4bit(torch.randn(4, 64), blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(formats.NF4_CODE, st.code)
    assert torch.equal(formats.CODE2, st.state2.code)  # derived in formats.py, checked bit for bit here


@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
# (33, 77): 33*77 is odd, so a partial last block and a padded nibble. Note: bnb 0.50.2's CPU
# dequantize_4bit is not consistent with its own quantize_4bit for some K that blocksize does not divide
# (e.g. [256, 384] at blocksize 256: it reads absmax[i // K] instead of absmax[i // blocksize]), so
# such shapes are compared on the quantize side only (test_nf4_codes_when_blocks_straddle_rows).
@pytest.mark.parametrize("shape", [(192, 512), (33, 77)])
def test_nf4_matches_bitsandbytes(blocksize, double_quant, dtype, shape):
    w = _weights(dtype, shape, seed=blocksize + 7 * double_quant)
    q_ref, st = BF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    qw = formats.quantize_weight(w, "nf4", blocksize=blocksize, double_quant=double_quant)
    assert torch.equal(qw.qdata, q_ref.view(-1)), "packed codes differ from bnb"
    assert torch.equal(qw.scales, st.absmax), "absmax (or its 8-bit codes) differ from bnb"
    if double_quant:
        assert torch.equal(qw.absmax2, st.state2.absmax)
        assert qw.offset.item() == float(st.offset)
    deq_ref = BF.dequantize_4bit(q_ref, st)
    assert deq_ref.dtype == dtype
    assert torch.equal(formats.dequantize(qw, dtype), deq_ref)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_codes_when_blocks_straddle_rows(double_quant):
    w = _weights(torch.bfloat16, (64, 384), seed=3)
    q_ref, st = BF.quantize_4bit(w, blocksize=256, quant_type="nf4", compress_statistics=double_quant)
    qw = formats.quantize_weight(w, "nf4", blocksize=256, double_quant=double_quant)
    assert torch.equal(qw.qdata, q_ref.view(-1)) and torch.equal(qw.scales, st.absmax)
    # blocks run over the flattened weight: element i uses absmax[i // 256]
    idx = formats.unpack_nibbles(qw.qdata, w.numel()).long()
    absmax = formats.nf4_absmax(qw).repeat_interleave(256)
    ref = (formats.NF4_CODE[idx] * absmax).view(64, 384).to(torch.bfloat16)
    assert torch.equal(formats.dequantize(qw, torch.bfloat16), ref)


def test_nested_codes_hit_bnbs_grid_rounding():
    # Values chosen right next to midpoints of the 8-bit code book: plain "nearest code" disagrees
    # with bnb for some of them; the 16-bit-grid rule in formats.py must agree for all.
    mid = (formats.CODE2[1:] + formats.CODE2[:-1]) / 2
    vals = torch.cat([mid + d for d in (-3e-6, -1e-6, 1e-6, 3e-6)]).clamp(-1, 1)
    blocks = vals.view(-1, 255)
    x = torch.cat([torch.ones(blocks.shape[0], 1), blocks], 1).reshape(-1)
    q_ref, _ = BF.quantize_blockwise(x, code=formats.CODE2, blocksize=256)
    q, _ = formats._absmax_quantize(x, 256, formats.CODE2, formats._midpoints(formats.CODE2), grid16=True)
    assert torch.equal(q, q_ref)
    q_nearest, _ = formats._absmax_quantize(x, 256, formats.CODE2, formats._midpoints(formats.CODE2))
    assert not torch.equal(q_nearest, q_ref)  # the rule is really needed


@pytest.mark.parametrize("double_quant", [False, True])
def test_import_bnb_linear4bit(double_quant):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 40)
    l4 = bnb.nn.Linear4bit(128, 40, bias=True, compute_dtype=torch.float32, compress_statistics=double_quant,
                           quant_type="nf4")
    l4.load_state_dict(lin.state_dict())
    l4 = l4.to("cpu")  # bnb quantizes on the move
    q = from_bnb(l4)
    assert isinstance(q, QuantLinear) and q.double_quant == double_quant
    st = l4.weight.quant_state
    assert torch.equal(q.dequantize(torch.float32), BF.dequantize_4bit(l4.weight.data, st))
    x = torch.randn(5, 128)
    torch.testing.assert_close(q(x), l4(x), rtol=1e-5, atol=1e-5)
    model = torch.nn.Sequential(l4, torch.nn.ReLU())
    assert import_bnb(model) == ["0"] and isinstance(model[0], QuantLinear)


def test_import_bnb_rejects_fp4_and_unquantized():
    l4 = bnb.nn.Linear4bit(64, 16, quant_type="fp4")
    with pytest.raises(ValueError, match="no quant_state"):
        from_bnb(l4)
    l4 = l4.to("cpu")
    with pytest.raises(ValueError, match="fp4"):
        from_bnb(l4)
