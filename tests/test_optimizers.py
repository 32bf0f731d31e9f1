"""fastpeft.optimizers against peft.optimizers (0.21.2) on twin models with the same weights: the same parameter
groups (by parameter name, lr, weight decay), and one optimizer step changes the same parameters by the same
amounts."""
import math

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft import optimizers as fopt
from tests._support.twins import peft_model_twins

peft = pytest.importorskip("peft")
import peft.optimizers as popt  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.q = nn.Linear(16, 24)
        self.ln = nn.LayerNorm(24)
        self.out = nn.Linear(24, 8)

    def forward(self, ids):
        return self.out(self.ln(torch.relu(self.q(self.emb(ids)))))


def _twins(**extra):
    torch.manual_seed(0)
    cfg = dict(target_modules=["emb", "q", "out"], r=4, lora_alpha=8, init_lora_weights=False,
               modules_to_save=["ln"], **extra)
    return peft_model_twins(Net(), cfg)


def _loss(model, ids):
    return model(ids).square().mean()


def _groups_by_name(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return [(sorted(names[id(p)] for p in g["params"]), g["lr"], g.get("weight_decay")) for g in optimizer.param_groups]


def _step(model, opt, ids):
    opt.zero_grad()
    _loss(model, ids).backward()
    opt.step()


def _assert_same_params(ours, theirs, rtol=1e-5, atol=1e-7):
    po = dict(ours.named_parameters())
    for n, p in theirs.named_parameters():
        assert torch.allclose(p, po[n], rtol=rtol, atol=atol), n


def test_loraplus_groups_and_step_equal_peft():
    ours, theirs = _twins(bias="lora_only")
    kw = dict(lr=1e-2, loraplus_lr_ratio=16.0, loraplus_weight_decay=0.1, loraplus_lr_embedding=1e-3)
    opt_t = popt.create_loraplus_optimizer(theirs, torch.optim.AdamW, **kw)
    opt_o = fopt.create_loraplus_optimizer(ours, torch.optim.AdamW, **kw)
    groups = _groups_by_name(ours, opt_o)
    assert groups == _groups_by_name(theirs, opt_t)
    (a, lr_a, _), (emb, lr_e, _), (b, lr_b, wd_b), (b_nd, _, wd_nd) = groups
    assert lr_a == 1e-2 and lr_e == 1e-3 and lr_b == 0.16 and (wd_b, wd_nd) == (0.1, 0.0)
    assert all("lora_A" in n for n in a) and all("lora_embedding" in n for n in emb) and len(emb) == 2
    assert any("lora_B" in n for n in b) and any("modules_to_save" in n and "ln" in n for n in b_nd)
    assert any(n.endswith("q.base_layer.bias") for n in b_nd)  # lora_only biases: 1-D, not decayed

    ids = torch.randint(0, 20, (3, 5))
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    _step(theirs, opt_t, ids)
    _step(ours, opt_o, ids)
    _assert_same_params(ours, theirs)
    changed = {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in ours.named_parameters() if p.requires_grad}


def test_lorafa_groups_and_steps_equal_peft():
    ours, theirs = _twins()
    opt_t = popt.create_lorafa_optimizer(theirs, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.01)
    opt_o = fopt.create_lorafa_optimizer(ours, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.01)
    gt, go = opt_t.param_groups[0], opt_o.param_groups[0]
    assert go["names"] == gt["names"] and go["scaling_factors"] == gt["scaling_factors"]
    assert (go["lr"], go["weight_decay"], go["betas"], go["scaling_factor"]) == \
        (gt["lr"], gt["weight_decay"], gt["betas"], gt["scaling_factor"])
    assert [n for n, p in ours.named_parameters() if "lora_A" in n and p.requires_grad] == []
    ids = torch.randint(0, 20, (3, 5))
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    for _ in range(3):
        _step(theirs, opt_t, ids)
        _step(ours, opt_o, ids)
    # the B update is computed in bf16 (as peft does); same inputs give the same bf16 products
    _assert_same_params(ours, theirs, rtol=1e-4, atol=1e-6)
    for n, p in ours.named_parameters():
        moved = not torch.equal(p, before[n])
        if "lora_A" in n or "lora_embedding_A" in n or not p.requires_grad:
            assert not moved, n
        elif "lora_B" in n or "lora_embedding_B" in n:
            assert moved, n


def test_lorafa_projection_formula():
    # one B step from zero Adam state (bias-corrected step size, eps on sqrt(v)) with g' from LoRA-FA's formula
    ours, _ = _twins()
    opt = fopt.create_lorafa_optimizer(ours, r=4, lora_alpha=8, lr=1e-3)
    q = ours.base_model.model.q
    ids = torch.randint(0, 20, (2, 3))
    _loss(ours, ids).backward()
    A, B = q.lora_A["default"].weight, q.lora_B["default"].weight
    inv = torch.linalg.pinv(A @ A.T + 1e-8 * torch.eye(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the product in bf16, as peft computes it
        g = (1 / q.scaling["default"] ** 2) * (B.grad @ inv)
    g = g.float()
    step_size = 1e-3 * math.sqrt(1 - 0.999) / (1 - 0.9)
    expected = B.detach() - step_size * (0.1 * g) / ((0.001 * g * g).sqrt() + 1e-6)
    opt.step()
    assert torch.allclose(B, expected, rtol=1e-4, atol=1e-7)


def test_lorafa_refuses_parameters_it_cannot_pair():
    ours, _ = _twins(use_dora=True)
    with pytest.raises(ValueError, match="lora_magnitude_vector.*A / B pairs only"):
        fopt.create_lorafa_optimizer(ours, r=4, lora_alpha=8, lr=1e-3)


@pytest.mark.parametrize("opt_cls,kw", [(torch.optim.AdamW, dict(weight_decay=0.01)), (torch.optim.SGD, {})])
def test_riemannian_step_equals_peft(opt_cls, kw):
    ours, theirs = _twins(use_dora=True)  # the magnitude is stepped without preconditioning
    opt_t = popt.create_riemannian_optimizer(theirs, opt_cls, lr=1e-2, reg=1e-3, **kw)
    opt_o = fopt.create_riemannian_optimizer(ours, opt_cls, lr=1e-2, reg=1e-3, **kw)
    assert isinstance(opt_o, opt_cls) and _groups_by_name(ours, opt_o) == _groups_by_name(theirs, opt_t)
    ids = torch.randint(0, 20, (3, 5))
    for _ in range(2):
        _step(theirs, opt_t, ids)
        _step(ours, opt_o, ids)
    _assert_same_params(ours, theirs, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="does not support closures"):
        opt_o.step(lambda: 0.0)
    with pytest.raises(ValueError, match="requires a closure"):
        fopt.create_riemannian_optimizer(ours, torch.optim.LBFGS, lr=1.0)
    with pytest.raises(TypeError, match="subclass of torch.optim.Optimizer"):
        fopt.create_riemannian_optimizer(ours, object, lr=1.0)


def test_riemannian_preconditioned_gradient_formula():
    ours, _ = _twins()
    opt = fopt.create_riemannian_optimizer(ours, torch.optim.SGD, lr=0.5, reg=1e-2)
    q = ours.base_model.model.q
    A, B = q.lora_A["default"].weight, q.lora_B["default"].weight
    _loss(ours, torch.randint(0, 20, (2, 3))).backward()
    eye = torch.eye(4)
    gA = torch.linalg.pinv(B.T @ B + 1e-2 * eye) @ A.grad
    gB = B.grad @ torch.linalg.pinv(A @ A.T + 1e-2 * eye)
    A0, B0 = A.detach().clone(), B.detach().clone()
    opt.step()
    assert torch.allclose(A, A0 - 0.5 * gA, atol=1e-6) and torch.allclose(B, B0 - 0.5 * gB, atol=1e-6)


def test_no_lora_pairs_is_an_error():
    model = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="did not find any trainable lora_A/lora_B"):
        fopt.create_riemannian_optimizer(model, torch.optim.SGD, lr=0.1)
    assert fastpeft.optimizers.create_loraplus_optimizer is fopt.create_loraplus_optimizer
