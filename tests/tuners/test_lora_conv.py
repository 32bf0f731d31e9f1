"""LoRA on nn.Conv1d / Conv2d / Conv3d against HF peft: same state_dict keys and shapes, same outputs and
gradients (float64), merge / unmerge / safe_merge / merge_and_unload, several adapters, DoRA, lora_bias,
rank_pattern, adapter_names, peft's refusals, and save/load both ways through save_pretrained/from_pretrained."""
from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastpeft
from fastpeft.tuners.lora import Conv1d, Conv2d, Conv3d, LoraConfig, LoraModel
from _support.twins import copy_weights, lora_twins, max_abs_diff, peft_model_twins


class ConvNet(nn.Module):
    """Odd shapes: Conv1d / Conv2d / Conv3d branches with stride, groups, dilation ('same'), padding modes."""

    def __init__(self, dims: int = 2, **conv_kw):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.dims = dims
        self.c0 = conv(6, 10, 3, **conv_kw)
        self.c1 = conv(10, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.c0(x))
        h = self.c1(h)
        return self.head(h.flatten(2).mean(-1))


def _x(dims, n=3, size=(7, 9, 5), dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, *size[:dims], generator=g, dtype=dtype)


def _build(dims=2, seed=0, **conv_kw):
    torch.manual_seed(seed)
    return ConvNet(dims, **conv_kw).double()


def _twins(base, **cfg):
    cfg.setdefault("target_modules", ["c0", "c1"])
    cfg.setdefault("init_lora_weights", False)
    ours, theirs = lora_twins(base, **cfg)
    ours, theirs = ours.double(), theirs.double()
    copy_weights(theirs, ours)  # strict: same keys and shapes
    return ours, theirs


def _outputs_and_grads(model, x, train=False, seed=0):
    model.train(train)
    for p in model.parameters():
        p.grad = None
    xg = x.clone().requires_grad_()
    torch.manual_seed(seed)
    y = model(xg)
    y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), xg.grad, grads


def _assert_twins_equal(ours, theirs, x, tol=1e-10):
    yo, gxo, go = _outputs_and_grads(ours, x)
    yt, gxt, gt = _outputs_and_grads(theirs, x)
    assert max_abs_diff(yo, yt) <= tol
    assert max_abs_diff(gxo, gxt) <= tol
    assert go.keys() == gt.keys() and go
    for n in go:
        assert max_abs_diff(go[n], gt[n]) <= tol, n
    with torch.no_grad():  # inference path (fold)
        assert max_abs_diff(ours.eval()(x), theirs.eval()(x)) <= tol


CASES = [
    (1, dict(padding=1)),
    (1, dict(stride=2, padding=2, padding_mode="circular")),
    (2, dict(padding=1)),
    (2, dict(stride=2, padding=(1, 0))),
    (2, dict(groups=2, padding=1)),
    (2, dict(padding="same", dilation=2)),
    (2, dict(padding=1, padding_mode="reflect")),
    (2, dict(padding="valid", bias=False)),
    (3, dict(stride=(1, 2, 1), padding=1, padding_mode="replicate")),
    (3, dict(padding=0)),
]


@pytest.mark.parametrize("dims,kw", CASES, ids=[f"{d}d-{k}" for d, k in CASES])
def test_conv_twins_same_keys_outputs_grads(dims, kw):
    ours, theirs = _twins(_build(dims, **kw), r=4, lora_alpha=6)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    layer = ours.model.c0
    assert type(layer) is {1: Conv1d, 2: Conv2d, 3: Conv3d}[dims]
    assert repr(layer).startswith(f"lora.Conv{dims}d(")
    _assert_twins_equal(ours, theirs, _x(dims))


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_init_matches_peft_from_the_same_seed(init):
    base = _build(2, padding=1)
    torch.manual_seed(7)
    theirs = peft.LoraModel(copy.deepcopy(base), peft.LoraConfig(target_modules=["c0"], r=4, init_lora_weights=init),
                            "default")
    torch.manual_seed(7)
    ours = LoraModel(copy.deepcopy(base), LoraConfig(target_modules=["c0"], r=4, init_lora_weights=init), "default")
    for k, v in theirs.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k
    assert ours.model.c0.lora_B["default"].weight.abs().max() == 0


@pytest.mark.parametrize("p", [0.25])
def test_dropout_training_matches_peft_with_the_same_mask(p, monkeypatch):
    """peft draws nn.Dropout's mask; fastpeft regenerates its own from a seed. With peft's dropout replaced by
    fastpeft's mask for the same seed, outputs and every gradient agree (the mask is shared by A's conv input
    only, in both)."""
    from fastpeft.ops import adapter_seed, draw_seed, dropout_mask

    ours, theirs = _twins(_build(2, stride=2, padding=1, groups=2), r=4, lora_dropout=p, target_modules=["c0"])
    x = _x(2)
    torch.manual_seed(0)
    seed = int(draw_seed())
    keep = dropout_mask(adapter_seed(seed, 0), x.shape, p, x.device)
    theirs.model.c0.lora_dropout["default"].forward = lambda t: t * keep / (1 - p)
    yo, gxo, go = _outputs_and_grads(ours, x, train=True, seed=0)
    yt, gxt, gt = _outputs_and_grads(theirs, x, train=True, seed=0)
    assert max_abs_diff(yo, yt) <= 1e-10 and max_abs_diff(gxo, gxt) <= 1e-10
    for n in go:
        assert max_abs_diff(go[n], gt[n]) <= 1e-10, n


def test_merge_unmerge_safe_merge_and_unload_match_peft():
    base = _build(2, padding=1)
    ours, theirs = _twins(base, r=4, lora_alpha=8, use_rslora=True)
    x = _x(2)
    with torch.no_grad():
        y = ours(x)
        ours.merge_adapter()
        assert ours.model.c0.merged
        assert max_abs_diff(ours(x), y) <= 1e-10
        ours.unmerge_adapter()
        assert max_abs_diff(ours.model.c0.base_layer.weight, base.c0.weight) <= 1e-12
        ours.model.c0.merge(safe_merge=True)
        assert max_abs_diff(ours(x), y) <= 1e-10
        ours.model.c0.unmerge()
        theirs_merged = theirs.merge_and_unload()
        ours_merged = ours.merge_and_unload()
        assert type(ours_merged.c0) is nn.Conv2d
        assert max_abs_diff(ours_merged.c0.weight, theirs_merged.c0.weight) <= 1e-12
        assert max_abs_diff(ours_merged(x), y) <= 1e-10


def test_merge_conv3d_pointwise_kernel():
    # peft's get_delta_weight mis-squeezes a 5-d (1, 1, k) kernel and fails; fastpeft merges it exactly
    ours, _ = _twins(_build(3, padding=0), r=3, target_modules=["c1"])
    x = _x(3)
    with torch.no_grad():
        y = ours(x)
        ours.merge_adapter()
        assert max_abs_diff(ours(x), y) <= 1e-10


def test_safe_merge_detects_nan():
    ours, _ = _twins(_build(2, padding=1), r=4, target_modules=["c0"])
    with torch.no_grad():
        ours.model.c0.lora_A["default"].weight[0, 0, 0, 0] = float("nan")
    w = ours.model.c0.base_layer.weight.clone()
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        ours.model.c0.merge(safe_merge=True)
    assert torch.equal(ours.model.c0.base_layer.weight, w)


def test_groups_rules_are_peft_s():
    with pytest.warns(UserWarning, match="groups > 1. Merging is not supported"):
        LoraModel(_build(2, groups=2, padding=1), LoraConfig(target_modules=["c0"], r=4), "default")
    ours, theirs = _twins(_build(2, groups=2, padding=1), r=4, target_modules=["c0"])
    assert ours.model.c0.lora_B["default"].weight.shape == (10, 2, 1, 1)
    with pytest.raises(NotImplementedError, match="Merging is not supported for _ConvNd layers with groups > 1!"):
        ours.merge_adapter()
    msg = "Targeting a Conv2d with groups=2 and rank 3"
    for lib in (peft, fastpeft):
        with warnings.catch_warnings(), pytest.raises(ValueError, match=msg):
            warnings.simplefilter("ignore")
            (peft.LoraModel if lib is peft else LoraModel)(_build(2, groups=2, padding=1),
                                                           lib.LoraConfig(target_modules=["c0"], r=3), "default")
    # rank_pattern: per-layer ranks, and the check applies to them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = _twins(_build(2, groups=2, padding=1), r=4, rank_pattern={"c1": 5})
    assert ours.model.c1.lora_A["default"].weight.shape == (5, 10, 1, 1)
    _assert_twins_equal(ours, theirs, _x(2))


def test_dilated_base_with_explicit_padding_is_refused_like_peft():
    ours, theirs = _twins(_build(2, padding=2, dilation=2), r=4, target_modules=["c0"])
    with pytest.raises(RuntimeError):
        theirs(_x(2))
    with pytest.raises(ValueError, match="dilation 1, as peft builds it"):
        ours(_x(2))


def _multi_twins(base, cfg, extra, active):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = peft_model_twins(base, cfg, extra)
        for m in (ours, theirs):
            m.base_model.set_adapter(active)
    return ours, theirs


def test_several_adapters_lora_bias_and_delete():
    cfg = dict(target_modules=["c0", "c1"], init_lora_weights=False)
    ours, theirs = _multi_twins(_build(2, padding=1), dict(cfg, r=4, lora_bias=True),
                                [("two", dict(cfg, r=2, lora_alpha=5))], ["default", "two"])
    x = _x(2)
    _assert_twins_equal(ours, theirs, x)
    with torch.no_grad():
        y = ours(x)
        ours.base_model.merge_adapter(["default", "two"])
        assert max_abs_diff(ours(x), y) <= 1e-10
        ours.base_model.unmerge_adapter()
    ours.delete_adapter("two")
    theirs.delete_adapter("two")
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    _assert_twins_equal(ours, theirs, x)


def test_adapter_names_mixed_batch_matches_peft():
    cfg = dict(target_modules=["c0", "c1"], init_lora_weights=False)
    ours, theirs = _multi_twins(_build(2, padding=1), dict(cfg, r=4), [("two", dict(cfg, r=2))], "default")
    x = _x(2, n=4)
    names = ["two", "__base__", "default", "two"]
    with torch.no_grad():
        yo = ours.eval()(x, adapter_names=names)
        yt = theirs.eval()(x, adapter_names=names)
        assert max_abs_diff(yo, yt) <= 1e-10
        ours.set_adapter("two")
        assert max_abs_diff(yo[3:], ours(x[3:])) <= 1e-10


@pytest.mark.parametrize("dims,kw", [(2, dict(padding=1)), (1, dict(stride=2, padding=1)), (3, dict(padding=1)),
                                     (2, dict(groups=2, padding=1))])
def test_dora_conv_matches_peft(dims, kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = _twins(_build(dims, **kw), r=4, use_dora=True, target_modules=["c0"])
    m = ours.model.c0.lora_magnitude_vector["default"].weight
    assert m.shape == (1, 10) + (1,) * dims
    # the magnitude peft computed at init from the same (random) A, B is the one fastpeft computes
    fresh = copy.deepcopy(ours.model.c0)
    fresh.lora_variant["default"].init_magnitude(fresh, "default")
    assert max_abs_diff(fresh.lora_magnitude_vector["default"].weight, m) <= 1e-12
    with torch.no_grad():  # move m away from its init, so g != 1
        for mm in (ours, theirs):
            mm.model.c0.lora_magnitude_vector["default"].weight.mul_(1.3)
    x = _x(dims)
    _assert_twins_equal(ours, theirs, x)
    if kw.get("groups", 1) == 1:
        with torch.no_grad():
            y = ours(x)
            ours.merge_adapter()
            assert max_abs_diff(ours(x), y) <= 1e-10
            theirs.merge_adapter()
            assert max_abs_diff(ours.model.c0.base_layer.weight, theirs.model.c0.base_layer.weight) <= 1e-12
            ours.unmerge_adapter()
            theirs.unmerge_adapter()
            assert max_abs_diff(ours(x), y) <= 1e-10


def test_dora_conv_with_dropout_and_a_second_adapter_match_peft():
    ours, theirs = _multi_twins(_build(2, padding=1),
                                dict(r=4, use_dora=True, lora_dropout=0.3, target_modules=["c0"], init_lora_weights=False),
                                [("plain", dict(r=2, target_modules=["c0"], init_lora_weights=False))],
                                ["plain", "default"])
    x = _x(2)
    with torch.no_grad():  # eval: the chained order (plain first, then DoRA rescaling everything)
        assert max_abs_diff(ours.eval()(x), theirs.eval()(x)) <= 1e-10
    # training with dropout: both draw torch's nn.Dropout mask from the same RNG state here
    yo, gxo, go = _outputs_and_grads(ours, x, train=True, seed=3)
    yt, gxt, gt = _outputs_and_grads(theirs, x, train=True, seed=3)
    assert max_abs_diff(yo, yt) <= 1e-10 and max_abs_diff(gxo, gxt) <= 1e-10
    assert go.keys() == gt.keys()
    for n in go:
        assert max_abs_diff(go[n], gt[n]) <= 1e-10, n


@pytest.mark.parametrize("use_dora", [False, True])
def test_save_with_one_load_with_the_other(tmp_path, use_dora):
    base = _build(2, padding=1)
    cfg = dict(r=4, lora_alpha=8, target_modules=["c0", "c1"], init_lora_weights=False, use_dora=use_dora)
    x = _x(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
        theirs.save_pretrained(tmp_path / "peft")
        loaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
        with torch.no_grad():
            assert max_abs_diff(loaded.eval()(x), theirs.eval()(x)) <= 1e-10
        torch.manual_seed(4)
        ours = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**cfg))
        ours.save_pretrained(tmp_path / "ours")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        assert max_abs_diff(back.eval()(x), ours.eval()(x)) <= 1e-10
        assert max_abs_diff(ours(x), base(x)) > 1e-4  # the adapter acts
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_transformers_resnet_round_trip(tmp_path):
    """A tiny transformers ResNet (Conv2d with stride 2 and 1x1 shortcuts) saved by peft, loaded by fastpeft."""
    import transformers as T

    T.logging.set_verbosity_error()
    cfg = T.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 12], depths=[1, 1], layer_type="basic",
                         num_labels=3)
    torch.manual_seed(0)
    base = T.ResNetForImageClassification(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    lc = dict(r=4, target_modules=["convolution", "classifier.1"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lc))
        theirs.save_pretrained(tmp_path)
        ours = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert any(isinstance(m, Conv2d) for m in ours.modules())
    with torch.no_grad():
        yo, yt = ours.eval()(pixel_values=x).logits, theirs.eval()(pixel_values=x).logits
        assert max_abs_diff(yo, yt) <= 1e-5
        assert max_abs_diff(yo, base(pixel_values=x).logits) > 1e-4
        merged = ours.merge_and_unload()
        assert max_abs_diff(merged(pixel_values=x).logits, yt) <= 1e-5


def test_subclassed_base_conv_runs_its_own_forward():
    class Scaled(nn.Conv2d):
        def forward(self, x):
            return 2.0 * super().forward(x)

    torch.manual_seed(0)
    net = nn.Sequential(Scaled(6, 5, 3, padding=1)).double()
    ours, theirs = _twins(net, r=2, target_modules=["0"])
    x = _x(2)
    with torch.no_grad():
        assert max_abs_diff(ours(x), theirs(x)) <= 1e-10


def test_disable_adapters_and_unbatched_input():
    ours, theirs = _twins(_build(2, padding=1), r=4)
    x = _x(2, n=1)
    with torch.no_grad():
        y1 = ours.model.c0(x[0])
        assert y1.shape == (10, 7, 9)
        assert max_abs_diff(y1, theirs.model.c0(x[0])) <= 1e-10
        with ours.disable_adapter() if hasattr(ours, "disable_adapter") else _disabled(ours):
            assert max_abs_diff(ours.model.c0(x), F.conv2d(x, ours.model.c0.base_layer.weight,
                                                           ours.model.c0.base_layer.bias, padding=1)) == 0


class _disabled:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.model.disable_adapter_layers()

    def __exit__(self, *exc):
        self.model.enable_adapter_layers()


def test_compile_fullgraph_training_with_dropout_matches_eager():
    base = _build(2, padding=1).float()
    model = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, target_modules=["c0", "c1"], lora_dropout=0.2,
                                                              init_lora_weights=False)).train()
    x = _x(2).float()

    def step(fn):
        for p in model.parameters():
            p.grad = None
        torch.manual_seed(0)
        y = fn(x)
        y.square().sum().backward()
        return [y.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]

    torch._dynamo.reset()
    eager = step(model)
    compiled = step(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert len(eager) == 5
    for a, c in zip(eager, compiled):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
