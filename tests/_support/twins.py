"""peft twins: the same base model wrapped by fastpeft and by HF peft with the same config and weights.

``lora_twins`` wraps at the LoraModel level (tuners tests), ``peft_model_twins`` through
get_peft_model (PeftModel level, one or more adapters). With ``init_lora_weights=False`` the two
libraries draw different random adapters; ``copy_weights(theirs, ours)`` makes them identical (and
fails on any key or shape difference). ``assert_same_outputs`` then compares the two.
"""
from __future__ import annotations

import copy
import logging
import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import nn


def _quiet_peft():
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)


def lora_twins(base: nn.Module, **cfg):
    """(fastpeft LoraModel, peft LoraModel) on copies of ``base`` with the same LoraConfig(**cfg)."""
    import peft

    from fastpeft.tuners.lora import LoraConfig, LoraModel

    _quiet_peft()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.LoraModel(copy.deepcopy(base), peft.LoraConfig(**cfg), "default")
        ours = LoraModel(copy.deepcopy(base), LoraConfig(**cfg), "default")
    return ours, theirs


def peft_model_twins(base: nn.Module, cfg: dict, extra: Sequence[tuple] = (), same_weights: bool = True):
    """(fastpeft PeftModel, peft PeftModel) from get_peft_model on copies of ``base`` with LoraConfig(**cfg),
    then ``add_adapter(name, LoraConfig(**c))`` for each (name, c) in ``extra``. With ``same_weights``
    peft's tensors are copied into fastpeft's model (strict: same keys and shapes)."""
    import peft

    import fastpeft

    _quiet_peft()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**cfg))
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
        for name, c in extra:
            ours.add_adapter(name, fastpeft.LoraConfig(**c))
            theirs.add_adapter(name, peft.LoraConfig(**c))
    if same_weights:
        copy_weights(theirs, ours)
    return ours, theirs


def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy every tensor of src into dst by identical state_dict key (errors on any mismatch)."""
    dst.load_state_dict(src.state_dict(), strict=True)


def lora_names(model: nn.Module) -> list:
    """Sorted names of the LoRA-wrapped layers (modules with lora_A and a base_layer)."""
    return sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    d = (a.detach().double() - b.detach().double()).abs()
    return float("inf") if not torch.isfinite(d).all() else (d.max().item() if d.numel() else 0.0)


def assert_same_outputs(ours: nn.Module, theirs: nn.Module, forward: Callable, tol: float = 1e-5,
                        base: Optional[nn.Module] = None, min_effect: float = 1e-4):
    """forward(model) -> tensor for both twins in eval mode without grad: max |ours - theirs| <= tol
    (NaN never passes). With ``base``, the adapters must also really act: max |ours - base| > min_effect.
    Returns (y_ours, y_theirs)."""
    with torch.no_grad():
        y_ours, y_theirs = forward(ours.eval()), forward(theirs.eval())
        err = max_abs_diff(y_ours, y_theirs)
        assert err <= tol, f"fastpeft vs peft: max abs diff {err:.3g} > {tol:.0e}"
        if base is not None:
            effect = max_abs_diff(y_ours, forward(base.eval()))
            assert effect > min_effect, f"the adapters do not change the output ({effect:.3g})"
    return y_ours, y_theirs
