"""LoraConfig(trainable_token_indices=...) against HF peft 0.21.2 on tiny Llama (tied and untied), OPT and
GPT-2 built from configs: same modules and state_dict keys, same outputs and gradients, same files, adapters
saved by one load in the other, merge_and_unload / unload, several adapters, mixed batches, and peft's
tying rules, warnings and errors."""
from __future__ import annotations

import copy
import os
import re
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from _support.models import tiny_inputs, tiny_model
from _support.twins import _quiet_peft, max_abs_diff

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

TIED = dict(tie_word_embeddings=True)
UNTIED = dict(tie_word_embeddings=False)
CASES = {
    # a list: the input embedding; repeats allowed (the last copy wins, every copy trains, as in peft)
    "llama_tied_list": ("llama", TIED, ["q_proj"], [3, 5, 7, 5]),
    "llama_untied_dict": ("llama", UNTIED, ["q_proj"], {"embed_tokens": [3, 5], "lm_head": [4, 9]}),
    # same ids for the tied head: folded into the tie
    "llama_tied_same": ("llama", TIED, ["q_proj"], {"embed_tokens": [3, 5], "lm_head": [3, 5]}),
    # different ids: the head trains its own rows
    "llama_tied_differ": ("llama", TIED, ["q_proj"], {"embed_tokens": [3, 5], "lm_head": [4]}),
    "llama_tied_head_only": ("llama", TIED, ["q_proj"], {"lm_head": [4, 6]}),
    "opt": ("opt", {}, ["q_proj", "v_proj"], [3, 5, 60]),
    "gpt2": ("gpt2", {}, ["c_attn"], [3, 5, 60]),
}


def _twins(kind, over, targets, tokens, **extra):
    _quiet_peft()
    base = tiny_model(kind, **over)
    cfg = dict(target_modules=targets, trainable_token_indices=tokens, init_lora_weights=False, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
        ours = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**cfg))
    return base, ours, theirs


def _perturb_rows(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "trainable_tokens_delta" in n:
                p.add_(torch.randn(p.shape, generator=g))


def _ids(kind):
    ids = tiny_inputs(kind)["input_ids"]
    ids[0, :6] = torch.tensor([3, 5, 7, 4, 9, 6])  # selected tokens occur
    return ids


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _structure(model):
    return {n: type(m).__name__ for n, m in model.named_modules()
            if type(m).__name__ in ("TrainableTokensWrapper", "TrainableTokensLayer")}


def _grads(model, ids):
    model.eval()
    model.zero_grad()
    model(input_ids=ids).logits.square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_close_rel(a, b, what, tol=1e-5):
    err = max_abs_diff(a, b)
    assert err <= tol * max(1.0, b.abs().max().item()), f"{what}: max abs diff {err:.3g}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_twins_match_peft(case, tmp_path):
    kind, over, targets, tokens = CASES[case]
    base, ours, theirs = _twins(kind, over, targets, tokens)
    assert _structure(ours) == _structure(theirs)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(ours) == trainable(theirs)
    _perturb_rows(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ids = _ids(kind)

    y = _logits(theirs, ids)
    _assert_close_rel(_logits(ours, ids), y, "outputs")
    assert max_abs_diff(y, _logits(base, ids)) > 1e-3  # the rows really act
    g_ours, g_theirs = _grads(ours, ids), _grads(theirs, ids)
    assert sorted(g_ours) == sorted(g_theirs)
    for n in g_theirs:
        _assert_close_rel(g_ours[n], g_theirs[n], f"grad of {n}")

    d_ours, d_theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    ours.save_pretrained(d_ours)
    theirs.save_pretrained(d_theirs)
    f_ours = load_file(os.path.join(d_ours, "adapter_model.safetensors"))
    f_theirs = load_file(os.path.join(d_theirs, "adapter_model.safetensors"))
    assert sorted(f_ours) == sorted(f_theirs)
    assert any("token_adapter.trainable_tokens_delta" in k for k in f_ours)
    for k in f_theirs:
        torch.testing.assert_close(f_ours[k], f_theirs[k], rtol=0, atol=0, msg=k)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_peft = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), d_theirs)
        from_ours = peft.PeftModel.from_pretrained(copy.deepcopy(base), d_ours)
    _assert_close_rel(_logits(from_peft, ids), y, "fastpeft loading peft's folder")
    _assert_close_rel(_logits(from_ours, ids), y, "peft loading fastpeft's folder")

    merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    assert not any("TrainableTokens" in type(m).__name__ for m in merged_ours.modules())
    _assert_close_rel(_logits(merged_ours, ids), _logits(merged_theirs, ids), "merge_and_unload vs peft")
    if case not in ("llama_tied_differ", "llama_tied_head_only"):
        # (untied rows on a shared table: merging writes the head's rows into the embedding too, in peft as here)
        _assert_close_rel(_logits(merged_ours, ids), y, "merge_and_unload vs unmerged", tol=1e-5)
    assert sorted(merged_ours.state_dict()) == sorted(merged_theirs.state_dict())

    unloaded = from_peft.unload()
    _assert_close_rel(_logits(unloaded, ids), _logits(base, ids), "unload gives the base model back", tol=0)


def test_bf16_model_keeps_fp32_rows_like_peft():
    base = tiny_model("llama", **TIED).to(torch.bfloat16)
    cfg = dict(target_modules=["q_proj"], trainable_token_indices=[3, 5])
    ours = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**cfg))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    layer = ours.base_model.model.model.embed_tokens.token_adapter
    ref = theirs.base_model.model.model.embed_tokens.token_adapter
    assert layer.trainable_tokens_delta["default"].dtype == ref.trainable_tokens_delta["default"].dtype == torch.float32
    assert layer.trainable_tokens_original["default"].dtype == torch.float32
    _perturb_rows(theirs)
    ours.load_state_dict(theirs.state_dict())
    ids = _ids("llama")
    assert max_abs_diff(_logits(ours, ids), _logits(theirs, ids)) == 0


def _multi(kind="llama", over=TIED):
    base, ours, theirs = _twins(kind, over, ["q_proj"], [3, 5])
    extra = [("tok2", dict(target_modules=["k_proj"], trainable_token_indices=[4, 6], init_lora_weights=False)),
             ("other", dict(target_modules=["v_proj"], init_lora_weights=False))]
    for name, c in extra:
        ours.add_adapter(name, fastpeft.LoraConfig(**c))
        theirs.add_adapter(name, peft.LoraConfig(**c))
    _perturb_rows(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return base, ours, theirs


def test_several_adapters_set_disable_delete():
    base, ours, theirs = _multi()
    ids = _ids("llama")
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(ours) == trainable(theirs)
    for name in ("tok2", "other", "default"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        assert trainable(ours) == trainable(theirs), name
        _assert_close_rel(_logits(ours, ids), _logits(theirs, ids), f"active {name}")
        emb = ours.base_model.model.model.embed_tokens
        assert emb.active_adapters == theirs.base_model.model.model.embed_tokens.active_adapters
    with ours.disable_adapter(), theirs.disable_adapter():
        _assert_close_rel(_logits(ours, ids), _logits(base, ids), "disabled", tol=0)
        _assert_close_rel(_logits(theirs, ids), _logits(base, ids), "disabled (peft)", tol=0)
    assert trainable(ours) == trainable(theirs)

    ours.set_adapter("tok2")
    theirs.set_adapter("tok2")
    ours.delete_adapter("tok2")
    theirs.delete_adapter("tok2")
    assert ours.active_adapters == theirs.active_adapters == ["default"]
    layer = ours.base_model.model.model.embed_tokens.token_adapter
    assert list(layer.trainable_tokens_delta) == ["default"] and list(layer.token_indices) == ["default"]
    assert "tok2" not in ours.base_model.model.lm_head.token_adapter.token_indices  # tied: the same dicts
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    _assert_close_rel(_logits(ours, ids), _logits(theirs, ids), "after delete")


def test_two_token_adapters_cannot_be_active_together():
    _, ours, _ = _multi()
    with pytest.raises(ValueError, match="Only one adapter can be set at a time"):
        ours.set_adapter(["default", "tok2"])
    ours.base_model.set_adapter(["default", "other"])  # one with rows, one LoRA-only: fine
    assert ours.base_model.model.model.embed_tokens.active_adapters == ["default"]


def test_merge_adapter_refuses_overlapping_rows_like_peft():
    _, ours, theirs = _twins("llama", TIED, ["q_proj"], [3, 5])
    for m, lib in ((ours, fastpeft), (theirs, peft)):
        m.add_adapter("b", lib.LoraConfig(target_modules=["k_proj"], trainable_token_indices=[5, 8]))
    msg = "Token indices of adapter b are already defined and would result in undefined merging behavior"
    for m in (ours, theirs):
        with pytest.raises(ValueError, match=msg):
            m.base_model.merge_adapter(["default", "b"])


def test_mixed_batch_matches_peft():
    base, ours, theirs = _multi()
    ids = _ids("llama")
    ids[1, :3] = torch.tensor([4, 6, 3])
    for names in (["default", "tok2"], ["__base__", "tok2"], ["tok2", "tok2"]):
        with torch.no_grad():
            y_ours = ours.eval()(input_ids=ids, adapter_names=names).logits
            y_theirs = theirs.eval()(input_ids=ids, adapter_names=names).logits
        _assert_close_rel(y_ours, y_theirs, f"adapter_names={names}")
    # peft raises KeyError for an adapter without rows in a token wrapper; fastpeft runs its rows on the base table
    with torch.no_grad():
        mixed = ours(input_ids=ids, adapter_names=["default", "other"]).logits
        ours.set_adapter("other")
        alone = ours(input_ids=ids).logits
    _assert_close_rel(mixed[1], alone[1], "LoRA-only adapter in a mixed batch")


def _raises_like_peft(exc, cfg, over=TIED, kind="llama"):
    """Both libraries refuse ``cfg`` with ``exc`` and the same message (peft's class names aside)."""
    msgs = []
    for lib in (peft, fastpeft):
        with warnings.catch_warnings(), pytest.raises(exc) as info:
            warnings.simplefilter("ignore")
            lib.get_peft_model(tiny_model(kind, **over), lib.LoraConfig(**cfg))
        msgs.append(re.sub(r"<class '[^']*'>", "<class>", str(info.value)))
    assert msgs[0] == msgs[1]


def test_refusals_match_peft():
    _raises_like_peft(TypeError, dict(target_modules=["q_proj", "embed_tokens"], trainable_token_indices=[3]))
    _raises_like_peft(ValueError, dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                       trainable_token_indices={"embed_tokens": [3]}))
    _raises_like_peft(ValueError, dict(target_modules=["q_proj"], ensure_weight_tying=True,
                                       trainable_token_indices={"embed_tokens": [3, 5], "lm_head": [4]}))
    _raises_like_peft(ValueError, dict(target_modules=["q_proj"], trainable_token_indices={"embedx": [3]}))


def test_out_of_range_ids_name_the_layer():
    with pytest.raises(IndexError, match=r"trainable token ids \[64\] of adapter 'default' are out of range for the "
                                         r"Embedding with 64 rows"):
        fastpeft.get_peft_model(tiny_model("llama"), fastpeft.LoraConfig(target_modules=["q_proj"],
                                                                          trainable_token_indices=[3, 64]))


def _warnings(lib, cfg, over):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        lib.get_peft_model(tiny_model("llama", **over), lib.LoraConfig(**cfg))
    keep = ("ensure_weight_tying", "tie_word_embeddings")
    return sorted(str(w.message) for w in got if any(k in str(w.message) for k in keep))


@pytest.mark.parametrize("cfg,over", [
    (dict(target_modules=["q_proj"], ensure_weight_tying=True, trainable_token_indices=[3]), UNTIED),
    (dict(target_modules=["q_proj"], ensure_weight_tying=True, trainable_token_indices=[3]), TIED),
    (dict(target_modules=["q_proj"], ensure_weight_tying=True), TIED),
    (dict(target_modules=["q_proj", "embed_tokens"]), TIED),
    (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), TIED),
])
def test_tying_warnings_match_peft(cfg, over):
    theirs = _warnings(peft, cfg, over)
    assert theirs  # each case warns in peft
    assert _warnings(fastpeft, cfg, over) == theirs


def test_unimplemented_tying_is_refused_by_name():
    with pytest.raises(NotImplementedError, match="ensure_weight_tying=True with an embedding layer in modules_to_save"):
        fastpeft.get_peft_model(tiny_model("llama", **TIED), fastpeft.LoraConfig(
            target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True))
    with pytest.raises(NotImplementedError, match="LoRA on 'lm_head', whose weight is tied to the input embedding"):
        fastpeft.get_peft_model(tiny_model("llama", **TIED), fastpeft.LoraConfig(
            target_modules=["q_proj", "lm_head"], trainable_token_indices=[3]))
    with pytest.raises(NotImplementedError, match="also in modules_to_save"):
        fastpeft.get_peft_model(tiny_model("llama", **TIED), fastpeft.LoraConfig(
            target_modules=["q_proj"], modules_to_save=["embed_tokens"], trainable_token_indices=[3]))


def test_standalone_trainable_tokens_adapter_is_refused_by_name(tmp_path):
    # peft's TrainableTokensConfig (peft_type TRAINABLE_TOKENS) is not implemented: its folders are refused, not
    # loaded into something else
    peft.get_peft_model(tiny_model("llama"), peft.TrainableTokensConfig(token_indices=[3, 4])).save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match="TRAINABLE_TOKENS"):
        fastpeft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path))
