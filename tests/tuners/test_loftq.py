"""LoftQ against HF peft 0.21.2, run on the same inputs.

peft's LoftQ code moves its work to "cuda" (a string constant in loftq_init / _loftq_init_new); the tests run
peft's own functions with that one constant replaced by "cpu" (bitsandbytes' CPU path quantizes and
dequantizes there; K is a multiple of 64, where bnb's CPU nf4 dequantization is right). peft's LoraConfig also
asks for scipy with init_lora_weights="loftq" without using it; it is made to find it while the config is built.
"""
import contextlib
import copy
import importlib.util
import json
import types
import warnings

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.utils.loftq_utils import loftq_init, low_rank_decomposition

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
import peft.tuners.lora.layer as peft_layer  # noqa: E402
import peft.utils.loftq_utils as peft_loftq  # noqa: E402


def _on_cpu(fn):
    """peft's function with its compute device constant "cuda" replaced by "cpu" (and its no_grad kept)."""
    fn = getattr(fn, "__wrapped__", fn)
    consts = tuple("cpu" if c == "cuda" else c for c in fn.__code__.co_consts)
    assert consts != fn.__code__.co_consts, "peft's function no longer names 'cuda': revisit this test helper"
    new = types.FunctionType(fn.__code__.replace(co_consts=consts), fn.__globals__, fn.__name__, fn.__defaults__,
                             fn.__closure__)
    return torch.no_grad()(new)


@contextlib.contextmanager
def _scipy_found():
    real = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a, **k: real("torch") if name == "scipy" else real(name, *a, **k)
    try:
        yield
    finally:
        importlib.util.find_spec = real


@pytest.fixture
def peft_on_cpu(monkeypatch):
    monkeypatch.setattr(peft_layer, "loftq_init", _on_cpu(peft_loftq.loftq_init))
    monkeypatch.setattr(peft_loftq, "_loftq_init_new", _on_cpu(peft_loftq._loftq_init_new))
    warnings.simplefilter("ignore")


class Net(nn.Module):
    def __init__(self, linear=nn.Linear):
        super().__init__()
        self.a = linear(128, 64)
        self.b = linear(64, 192)
        self.emb = nn.Embedding(10, 128)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,iters", [(4, 1), (4, 3), (8, 1), (8, 2)])
def test_loftq_init_is_peft_bit_for_bit(peft_on_cpu, dtype, bits, iters):
    g = torch.Generator().manual_seed(bits * 10 + iters)
    w = (torch.randn(96, 192, generator=g) * 0.05).to(dtype)
    w[3, :64] = 0  # an all-zero nf4 block
    q_ref, A_ref, B_ref = _on_cpu(peft_loftq.loftq_init)(w, num_bits=bits, reduced_rank=6, num_iter=iters)
    q, A, B = loftq_init(w, num_bits=bits, reduced_rank=6, num_iter=iters)
    assert q.dtype == dtype and A.dtype == B.dtype == torch.float32
    assert torch.equal(q, q_ref) and torch.equal(A, A_ref) and torch.equal(B, B_ref)


def test_loftq_reduces_the_quantization_error_float64_reference():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    q, A, B = loftq_init(w, num_bits=4, reduced_rank=8, num_iter=4)
    # the factors are the rank-8 truncated SVD of the last residual, checked in float64
    U, S, Vh = torch.linalg.svd((w - q).double(), full_matrices=False)
    best = (U[:, :8] * S[:8]) @ Vh[:8]
    assert torch.allclose((B @ A).double(), best, atol=1e-5)
    assert (w - q - B @ A).norm() < 0.9 * (w - q).norm()


def test_loftq_errors_name_the_problem():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="loftq_bits 4 .* and 8"):
        loftq_init(w, num_bits=2, reduced_rank=2)
    with pytest.raises(ValueError, match="loftq_iter must be a positive int"):
        loftq_init(w, num_bits=4, reduced_rank=2, num_iter=0)
    with pytest.raises(ValueError, match="rank r=9 exceeds"):
        low_rank_decomposition(w, 9)


def _cfg(lib, **kw):
    return dict(target_modules=["a", "b"], r=4, lora_alpha=4, init_lora_weights="loftq",
                loftq_config=lib.LoftQConfig(loftq_bits=4, loftq_iter=2), **kw)


def test_get_peft_model_loftq_equals_peft_and_round_trips(peft_on_cpu, tmp_path):
    torch.manual_seed(0)
    base = Net()
    with _scipy_found():
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**_cfg(peft)))
    ours = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**_cfg(fastpeft)))
    sd_t, sd_o = theirs.state_dict(), ours.state_dict()
    assert sorted(sd_t) == sorted(sd_o)
    for k in sd_t:  # base weights (the dequantized nf4) and LoRA weights alike
        assert torch.equal(sd_t[k], sd_o[k]), k
    x = torch.randn(5, 128)
    assert torch.allclose(theirs(x), ours(x), atol=1e-6)
    # gradients
    theirs(x).square().sum().backward()
    ours(x).square().sum().backward()
    for (n, p), (_, q) in zip(theirs.named_parameters(), ours.named_parameters()):
        if p.requires_grad:
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-6), n

    # files both ways; a load runs LoftQ again on the base it is given (peft does: the saved config says loftq)
    theirs.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    for d in ("theirs", "ours"):
        cfg = json.load(open(tmp_path / d / "adapter_config.json"))
        assert cfg["init_lora_weights"] == "loftq" and cfg["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    with _scipy_found():
        peft_loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    ours_loaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "theirs"))
    sd_pl, sd_ol = peft_loaded.state_dict(), ours_loaded.state_dict()
    assert sorted(sd_pl) == sorted(sd_ol) and all(torch.equal(sd_pl[k], sd_ol[k]) for k in sd_pl)
    assert torch.allclose(peft_loaded(x), ours_loaded(x), atol=1e-6)


def test_loftq_with_8_bits_and_dora_matches_peft(peft_on_cpu):
    torch.manual_seed(1)
    base = Net()
    kw = dict(target_modules=["a"], r=4, lora_alpha=8, init_lora_weights="loftq", use_dora=True)
    with _scipy_found():
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            **kw, loftq_config=peft.LoftQConfig(loftq_bits=8, loftq_iter=1)))
    ours = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**kw, loftq_config={"loftq_bits": 8,
                                                                                                 "loftq_iter": 1}))
    sd_t, sd_o = theirs.state_dict(), ours.state_dict()
    assert sorted(sd_t) == sorted(sd_o)
    for k in sd_t:
        assert torch.allclose(sd_t[k], sd_o[k], rtol=1e-6, atol=1e-7), k
    x = torch.randn(3, 128)
    assert torch.allclose(theirs(x), ours(x), atol=1e-5)


@pytest.mark.parametrize("target", ["emb", "conv1d"])
def test_loftq_refused_where_peft_fails(target):
    if target == "conv1d":
        from transformers.pytorch_utils import Conv1D

        model = nn.Sequential()
        model.add_module("c", Conv1D(32, 64))
        target = "c"
    else:
        model = Net()
    cfg = fastpeft.LoraConfig(target_modules=[target], r=2, init_lora_weights="loftq",
                              loftq_config=fastpeft.LoftQConfig())
    with pytest.raises(NotImplementedError, match="init_lora_weights='loftq' on lora.*torch.nn.Linear layers only"):
        fastpeft.get_peft_model(model, cfg)


def _float_and_quantized(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    float_model = Net()
    save_file({k: v.contiguous() for k, v in float_model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    q = Net(lambda i, o: bnb.nn.Linear4bit(i, o, compute_dtype=torch.float32, quant_type="nf4"))
    q.load_state_dict(float_model.state_dict())
    return float_model, q.to("cpu")  # bnb quantizes on the move


def test_replace_lora_weights_loftq_equals_peft_on_bnb_and_fastpeft_nf4(peft_on_cpu, tmp_path):
    from fastpeft.quant import import_bnb

    float_model, qmodel = _float_and_quantized(tmp_path)
    mine = copy.deepcopy(qmodel)
    qmodel.is_loaded_in_4bit = True  # what transformers sets; peft then wraps the layers with its bnb Linear4bit
    cfg = dict(target_modules=["a", "b"], r=4, lora_alpha=4)
    theirs = peft.get_peft_model(qmodel, peft.LoraConfig(**cfg))
    assert type(theirs.base_model.model.a).__name__ == "Linear4bit"
    peft.replace_lora_weights_loftq(theirs, model_path=str(tmp_path))
    assert import_bnb(mine) == ["a", "b"]  # fastpeft's nf4 QuantLinear: bnb's codes, bit-identical dequant
    ours = fastpeft.get_peft_model(mine, fastpeft.LoraConfig(**cfg))
    before = ours.base_model.model.a.lora_A["default"].weight.clone()
    fastpeft.replace_lora_weights_loftq(ours, model_path=str(tmp_path / "model.safetensors"))
    for n in ("a", "b"):
        t, o = getattr(theirs.base_model.model, n), getattr(ours.base_model.model, n)
        assert torch.equal(t.lora_A["default"].weight, o.lora_A["default"].weight)
        assert torch.equal(t.lora_B["default"].weight, o.lora_B["default"].weight)
    assert not torch.equal(before, ours.base_model.model.a.lora_A["default"].weight)
    x = torch.randn(4, 128)
    assert torch.allclose(theirs(x), ours(x), atol=1e-5)
    # LoftQ brings the quantized model closer to the float one
    with ours.disable_adapter():
        plain_err = (ours(x) - float_model(x)).norm()
    assert (ours(x) - float_model(x)).norm() < plain_err


def test_replace_lora_weights_loftq_callback_rolls_back_and_errors(tmp_path):
    from fastpeft.quant import quantize

    float_model, _ = _float_and_quantized(tmp_path)
    model = copy.deepcopy(float_model)
    quantize(model, "int4", group_size=64)
    ours = fastpeft.get_peft_model(model, fastpeft.LoraConfig(target_modules=["a", "b"], r=4, lora_alpha=4))
    kept = {n: getattr(ours.base_model.model, n).lora_A["default"].weight.clone() for n in ("a", "b")}
    seen = []
    fastpeft.replace_lora_weights_loftq(ours, model_path=str(tmp_path), callback=lambda m, name: seen.append(name)
                                        or name == "a")
    assert seen == ["a", "b"]
    assert not torch.equal(ours.base_model.model.a.lora_A["default"].weight, kept["a"])  # kept
    assert torch.equal(ours.base_model.model.b.lora_A["default"].weight, kept["b"])  # rolled back
    # int4: B A is the rank-4 SVD of W - dequant(Q) (float64 reference)
    layer = ours.base_model.model.a
    res = (float_model.a.weight - layer.get_base_layer().dequantize(torch.float32)).double()
    U, S, Vh = torch.linalg.svd(res, full_matrices=False)
    B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    assert torch.allclose((B @ A).double(), (U[:, :4] * S[:4]) @ Vh[:4], atol=1e-5)

    plain = fastpeft.get_peft_model(copy.deepcopy(float_model), fastpeft.LoraConfig(target_modules=["a"]))
    with pytest.raises(ValueError, match="No quantized LoRA module found"):
        fastpeft.replace_lora_weights_loftq(plain, model_path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        fastpeft.replace_lora_weights_loftq(ours, model_path=str(tmp_path / "nowhere"))


def test_loftq_config_exports_and_serialisation():
    import fastpeft.tuners
    import fastpeft.tuners.lora
    import fastpeft.tuners.lora.config
    import fastpeft.utils

    assert fastpeft.LoftQConfig is fastpeft.tuners.LoftQConfig is fastpeft.tuners.lora.LoftQConfig
    assert fastpeft.tuners.lora.config.LoftQConfig is fastpeft.LoftQConfig
    assert fastpeft.utils.replace_lora_weights_loftq is fastpeft.replace_lora_weights_loftq
    cfg = fastpeft.LoraConfig(init_lora_weights="loftq", loftq_config=fastpeft.LoftQConfig(loftq_bits=8))
    assert cfg.loftq_config == {"loftq_bits": 8, "loftq_iter": 1} and cfg.unsupported_fields() == []
    with pytest.raises(ValueError, match="loftq_config"):
        fastpeft.LoraConfig(init_lora_weights="loftq")
