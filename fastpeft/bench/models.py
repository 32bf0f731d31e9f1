"""Builds the three things every benchmark row compares, with identical weights:

  base      the frozen model alone (inputs require grad, so backward computes dX as it must under LoRA)
  fastpeft  fastpeft.get_peft_model(copy of base, fastpeft LoraConfig)
  peft      peft.get_peft_model(copy of base, peft LoraConfig) with the same field values

With ``dora=True`` (``fastpeft bench --dora``) two more: ``fastpeft_dora`` and ``peft_dora``, the same
configs with ``use_dora=True`` (DORA_IMPLS).

The LoRA weights are drawn once (B non-zero, so the LoRA branch does real work and the outputs can be
compared) and copied into every adapter by parameter name, which the two libraries share. DoRA's
magnitude is set to the weight norm ||W + s B A||_row times (1 + 0.1 N(0, 1)), so that g = m / n is not
all ones (as it is right after peft's init) and the rescaling does real work.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

IMPLS = ("base", "fastpeft", "peft")
# The rows of a DoRA comparison (`fastpeft bench --dora`): each library's LoRA and DoRA, same A and B.
DORA_IMPLS = ("base", "fastpeft", "fastpeft_dora", "peft", "peft_dora")
_MAGNITUDE = "lora_magnitude_vector"


class BenchSetupError(RuntimeError):
    """The bench cannot run here (a library missing, a bad flag value); the CLI prints it without traceback."""


def fastpeft_api():
    """(get_peft_model, LoraConfig) from fastpeft, with an error that says what is missing."""
    try:
        from fastpeft import LoraConfig, get_peft_model  # type: ignore[attr-defined]
        return get_peft_model, LoraConfig
    except ImportError:
        pass
    try:
        from fastpeft.mapping import get_peft_model
        from fastpeft.tuners.lora.config import LoraConfig
    except ImportError as e:
        raise BenchSetupError(
            "fastpeft bench needs fastpeft.get_peft_model (fastpeft/mapping.py) and fastpeft LoraConfig "
            f"(fastpeft/tuners/lora/config.py); importing them failed: {e}") from e
    return get_peft_model, LoraConfig


def peft_api():
    try:
        import peft
    except ImportError as e:
        raise BenchSetupError("fastpeft bench compares against Hugging Face peft; install it (pip install peft): "
                           f"{e}") from e
    return peft.get_peft_model, peft.LoraConfig


def parse_dtype(name: str) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    try:
        return table[name.lower()]
    except KeyError:
        raise BenchSetupError(f"unknown dtype {name!r}; expected one of fp32, fp16, bf16") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def _lora_config_kwargs(r: int, alpha: float, dropout: float, targets: List[str], task_type: Optional[str],
                        use_dora: bool = False):
    kw = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    if task_type is not None:
        kw["task_type"] = task_type
    if use_dora:
        kw["use_dora"] = True
    return kw


def draw_lora_weights(model: nn.Module, seed: int) -> None:
    """Fresh LoRA weights (B non-zero) from ``seed``, drawn per ``lora_`` parameter in name order, so two
    models with the same parameter names (fastpeft's and peft's) get the same values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name and _MAGNITUDE not in name:
                p.copy_((torch.randn(p.shape, generator=gen, dtype=torch.float32) / p.shape[-1] ** 0.5).to(p.dtype))
        # A and B are drawn as above whether or not the model is DoRA (magnitudes draw nothing from gen), so
        # a LoRA model and a DoRA model drawn with one seed hold the same A and B.
        mgen = torch.Generator().manual_seed(seed + 7919)
        for name, mod in sorted(model.named_modules()):
            mags = getattr(mod, _MAGNITUDE, None)
            if not isinstance(mags, nn.ModuleDict) or len(mags) == 0:
                continue
            W = mod.get_base_layer().weight.float()
            for adapter in sorted(mags.keys()):
                A, B = mod.lora_A[adapter].weight.float(), mod.lora_B[adapter].weight.float()
                n = (W + mod.scaling[adapter] * (B @ A)).norm(dim=1)
                m = mags[adapter].weight
                jitter = 1.0 + 0.1 * torch.randn(n.shape, generator=mgen, dtype=torch.float32)
                m.copy_((n.cpu() * jitter).to(device=m.device, dtype=m.dtype))


def _sync_lora_weights(src: nn.Module, dst: nn.Module, seed: Optional[int]) -> None:
    """Draw fresh LoRA weights in `src` (unless seed is None) and copy every lora_ parameter into `dst` by
    name; a DoRA magnitude goes only where `dst` has one (from a DoRA `src` to a LoRA `dst` it is left out)."""
    if seed is not None:
        draw_lora_weights(src, seed)
    dst_params = dict(dst.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, p in src.named_parameters():
            if "lora_" not in name or (_MAGNITUDE in name and name not in dst_params):
                continue
            if name not in dst_params:
                raise KeyError(f"fastpeft model has no parameter {name!r} (peft has it); fastpeft lora_ "
                               f"parameters: {[n for n in dst_params if 'lora_' in n][:10]}")
            q = dst_params[name]
            if q.shape != p.shape:
                raise ValueError(f"parameter {name!r}: peft shape {tuple(p.shape)}, fastpeft {tuple(q.shape)}")
            q.copy_(p.to(q.dtype))
            copied += 1
    if copied == 0:
        raise RuntimeError("no lora_ parameters found in the peft model: nothing was adapted")


def _trainable(model: nn.Module) -> List[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _state_tensors(model: nn.Module) -> List[torch.Tensor]:
    return list(model.parameters()) + list(model.buffers())


def _adapter_dtype(model: nn.Module) -> Optional[str]:
    for name, p in model.named_parameters():
        if "lora_A" in name:
            return dtype_name(p.dtype)
    return None


@dataclass
class Bench:
    """One row: the callables to time and what saved-bytes counting must leave out."""

    name: str
    forward: Callable[[], torch.Tensor]          # forward in training mode, graph recorded
    step: Callable[[], None]                     # forward (+ loss) + backward
    grad_tensors: List[torch.Tensor]             # .grad reset between runs (outside timing)
    state: List[torch.Tensor]                    # params/buffers: excluded from saved bytes
    adapter_dtype: Optional[str] = None
    extra: Dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- layer
@dataclass
class LayerCase:
    M: int
    K: int
    N: int
    r: int
    dtype: torch.dtype
    dropout: float
    alpha: Optional[float] = None  # default 2r

    def label(self) -> str:
        return f"M={self.M} K={self.K} N={self.N} r={self.r} {dtype_name(self.dtype)}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dtype"] = dtype_name(self.dtype)
        d["alpha"] = self.lora_alpha
        return d

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else 2 * self.r)


class _OneLinear(nn.Module):
    """The smallest model peft and fastpeft can both wrap: one bias-free projection, as in Llama."""

    def __init__(self, K: int, N: int):
        super().__init__()
        self.proj = nn.Linear(K, N, bias=False)

    def forward(self, x):
        return self.proj(x)


def _adapted_models(base: nn.Module, kw: dict, seed: int, dora: bool) -> dict:
    """{impl: model}: "base" (the model itself) and the peft and fastpeft wraps of copies of it, with one
    set of LoRA weights (and, with ``dora``, the DoRA rows with the same A and B and one magnitude)."""
    f_get, f_cfg = fastpeft_api()
    p_get, p_cfg = peft_api()
    peft_model = p_get(copy.deepcopy(base), p_cfg(**kw))
    fast_model = f_get(copy.deepcopy(base), f_cfg(**kw))
    models = {"base": base, "fastpeft": fast_model, "peft": peft_model}
    if not dora:
        _sync_lora_weights(peft_model, fast_model, seed + 1)
        return models
    dkw = dict(kw, use_dora=True)
    try:
        peft_dora = p_get(copy.deepcopy(base), p_cfg(**dkw))
        fast_dora = f_get(copy.deepcopy(base), f_cfg(**dkw))
    except (NotImplementedError, TypeError, ValueError) as e:
        raise BenchSetupError(f"--dora: building the DoRA rows (LoraConfig(use_dora=True)) failed: "
                              f"{type(e).__name__}: {e}") from e
    _sync_lora_weights(peft_dora, fast_dora, seed + 1)   # A, B and the magnitude
    _sync_lora_weights(peft_dora, peft_model, None)      # the same A and B for the LoRA rows
    _sync_lora_weights(peft_dora, fast_model, None)
    models.update(fastpeft_dora=fast_dora, peft_dora=peft_dora)
    return models


def _rel_diff(out: torch.Tensor, ref: torch.Tensor) -> tuple:
    out, ref = out.float(), ref.float()
    return (out - ref).abs().max().item(), ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def build_layer(case: LayerCase, device: torch.device, seed: int = 0, pool: int = 4, dora: bool = False):
    """Returns ({impl: Bench}, info), impl in IMPLS (DORA_IMPLS with ``dora``). Each Bench calls the
    wrapped layer itself (not the PeftModel wrapper), so per-call Python overhead of the model wrapper
    does not blur small-M timings."""
    torch.manual_seed(seed)
    base = _OneLinear(case.K, case.N).to(device=device, dtype=case.dtype)
    base.requires_grad_(False)
    kw = _lora_config_kwargs(case.r, case.lora_alpha, case.dropout, ["proj"], None)
    owners = _adapted_models(base, kw, seed, dora)
    for m in owners.values():
        m.train()
    layers = {n: (m.proj if n == "base" else m.base_model.model.proj) for n, m in owners.items()}

    g = torch.Generator(device="cpu").manual_seed(seed + 2)
    xs = [torch.randn(case.M, case.K, generator=g).to(device=device, dtype=case.dtype).requires_grad_(True)
          for _ in range(pool)]
    dys = [torch.randn(case.M, case.N, generator=g).to(device=device, dtype=case.dtype) for _ in range(pool)]

    # Outputs must agree before timings mean anything (eval: dropout off).
    with torch.no_grad():
        for m in owners.values():
            m.eval()
        max_abs, rel = _rel_diff(layers["fastpeft"](xs[0]), layers["peft"](xs[0]))
        if dora:
            d_abs, d_rel = _rel_diff(layers["fastpeft_dora"](xs[0]), layers["peft_dora"](xs[0]))
        for m in owners.values():
            m.train()

    benches = {}
    for name in owners:
        layer = layers[name]
        counter = {"i": 0}

        def forward(layer=layer, counter=counter):
            i = counter["i"] = (counter["i"] + 1) % pool  # rotate inputs
            return layer(xs[i])

        def step(layer=layer, counter=counter):
            i = counter["i"] = (counter["i"] + 1) % pool
            layer(xs[i]).backward(dys[i])

        benches[name] = Bench(name, forward, step, grad_tensors=_trainable(owners[name]) + xs,
                              state=_state_tensors(owners[name]), adapter_dtype=_adapter_dtype(owners[name]))
    info = {"fastpeft_vs_peft_max_abs_diff": max_abs, "fastpeft_vs_peft_rel_diff": rel,
            "fastpeft_backend": _backend_for(layers["fastpeft"], xs[0], case.dropout)}
    if dora:
        info.update(fastpeft_dora_vs_peft_dora_max_abs_diff=d_abs, fastpeft_dora_vs_peft_dora_rel_diff=d_rel)
    return benches, info


def _backend_for(layer: nn.Module, x: torch.Tensor, dropout: float) -> Optional[str]:
    """The fastpeft.ops backend this layer's call dispatches to (None if fastpeft.ops cannot say)."""
    try:
        from fastpeft.ops import current_backend

        A = next(iter(layer.lora_A.values())).weight
        B = next(iter(layer.lora_B.values())).weight
        return str(current_backend(x, layer.base_layer.weight, layer.base_layer.bias, A, B, dropout))
    except Exception as e:  # reporting only; the timing itself shows whether the layer runs
        return f"unknown ({type(e).__name__}: {e})"


# --------------------------------------------------------------------------------------------- decoder
@dataclass
class DecoderCase:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    seq: int
    batch: int
    r: int
    dtype: torch.dtype
    dropout: float
    alpha: Optional[float] = None
    targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def label(self) -> str:
        return (f"Llama h={self.hidden} L={self.layers} seq={self.seq} batch={self.batch} r={self.r} "
                f"{dtype_name(self.dtype)}")

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else 2 * self.r)

    @property
    def tokens(self) -> int:
        return self.seq * self.batch

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dtype"] = dtype_name(self.dtype)
        d["alpha"] = self.lora_alpha
        d["targets"] = list(self.targets)
        return d


def _make_llama(case: DecoderCase, device: torch.device, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=case.vocab, hidden_size=case.hidden, intermediate_size=case.intermediate,
                      num_hidden_layers=case.layers, num_attention_heads=case.heads,
                      num_key_value_heads=case.kv_heads, max_position_embeddings=max(case.seq, 128),
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"  # the same attention kernel for all three rows
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    return model.to(device=device, dtype=case.dtype)


def _inputs_require_grad(model: nn.Module) -> None:
    """Make the embedding output require grad, so backward runs dX through every layer even for the
    frozen base row (what a frozen base needs under LoRA, where layer 0's dX feeds nothing trainable
    but later layers' dX does). Applied to all three rows so they do the same base work."""
    emb = model.get_input_embeddings()
    emb.register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))


def build_decoder(case: DecoderCase, device: torch.device, seed: int = 0, pool: int = 3, dora: bool = False):
    """Returns ({impl: Bench}, info), impl in IMPLS (DORA_IMPLS with ``dora``)."""
    base = _make_llama(case, device, seed)
    base.requires_grad_(False)
    kw = _lora_config_kwargs(case.r, case.lora_alpha, case.dropout, list(case.targets), "CAUSAL_LM")
    models = _adapted_models(base, kw, seed, dora)
    for m in models.values():
        _inputs_require_grad(m.get_base_model() if hasattr(m, "get_base_model") else m)

    g = torch.Generator(device="cpu").manual_seed(seed + 2)
    ids = [torch.randint(0, case.vocab, (case.batch, case.seq), generator=g).to(device) for _ in range(pool)]

    with torch.no_grad():
        for m in models.values():
            m.eval()
        max_abs, rel = _rel_diff(models["fastpeft"](input_ids=ids[0]).logits, models["peft"](input_ids=ids[0]).logits)
        if dora:
            d_abs, d_rel = _rel_diff(models["fastpeft_dora"](input_ids=ids[0]).logits,
                                     models["peft_dora"](input_ids=ids[0]).logits)
        for m in models.values():
            m.train()

    benches = {}
    for name, model in models.items():
        counter = {"i": 0}

        def forward(model=model, counter=counter):
            i = counter["i"] = (counter["i"] + 1) % pool
            return model(input_ids=ids[i], labels=ids[i]).loss

        def step(model=model, counter=counter):
            i = counter["i"] = (counter["i"] + 1) % pool
            model(input_ids=ids[i], labels=ids[i]).loss.backward()

        benches[name] = Bench(name, forward, step, grad_tensors=_trainable(model), state=_state_tensors(model),
                              adapter_dtype=_adapter_dtype(model),
                              extra={"trainable_params": sum(p.numel() for p in _trainable(model))})
    info = {"fastpeft_vs_peft_logits_max_abs_diff": max_abs, "fastpeft_vs_peft_logits_rel_diff": rel}
    if dora:
        info.update(fastpeft_dora_vs_peft_dora_logits_max_abs_diff=d_abs,
                    fastpeft_dora_vs_peft_dora_logits_rel_diff=d_rel)
    return benches, info
