"""LoRA layers and accelerate() on a CUDA GPU (marked `cuda`; run by benchmarks/device_check.sh).

Whatever backend fastpeft.ops picks there (cuda > triton > torch) must give peft's outputs and
gradients within 16-bit tolerances, for the injected fastpeft layers and for accelerate().
"""
import copy
import warnings

import pytest
import torch

from _support.models import ids_for, tiny_model
from _support.reference import rel_err
from _support.twins import copy_weights, lora_twins

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _grads(m):
    return {n: p.grad for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float32, 1e-2)])
def test_lora_model_matches_peft_on_cuda(dtype, tol):
    base = tiny_model("llama")
    ours, theirs = lora_twins(base, target_modules="all-linear", init_lora_weights=False, r=16)
    copy_weights(theirs, ours)
    ours, theirs = ours.cuda().to(dtype), theirs.cuda().to(dtype)
    ours.eval(), theirs.eval()
    ids = ids_for(base).cuda()
    y, y_ref = ours.model(ids).logits, theirs.model(ids).logits
    assert rel_err(y, y_ref) < tol
    y.float().pow(2).mean().backward()
    y_ref.float().pow(2).mean().backward()
    g, g_ref = _grads(ours), _grads(theirs)
    assert g.keys() == g_ref.keys()
    for n in g:
        assert rel_err(g[n], g_ref[n]) < 5 * tol, n


def test_accelerate_on_cuda_bf16_training_with_dropout():
    import peft
    from fastpeft.tuners.lora.accelerate import accelerate
    base = tiny_model("llama").cuda().to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, peft.LoraConfig(target_modules="all-linear", lora_dropout=0.1,
                                                       init_lora_weights=False, r=16))
        pm.add_adapter("two", peft.LoraConfig(target_modules=["q_proj"], r=4, init_lora_weights=False))
    pm.base_model.set_adapter(["default", "two"])
    ref = copy.deepcopy(pm)
    report = accelerate(pm)
    assert report.swapped == 14 and not report.skipped
    ids = ids_for(base).cuda()
    pm.eval(), ref.eval()
    y, y_ref = pm(ids).logits, ref(ids).logits
    assert rel_err(y, y_ref) < 3e-2
    y.float().pow(2).mean().backward()
    y_ref.float().pow(2).mean().backward()
    g, g_ref = _grads(pm), _grads(ref)
    for n in g:
        assert rel_err(g[n], g_ref[n]) < 0.15, n
    pm.train()
    torch.manual_seed(0)
    y1 = pm(ids).logits
    y1.float().sum().backward()
    assert torch.isfinite(y1).all()
