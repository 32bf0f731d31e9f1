"""Import compressed-tensors checkpoints (llm-compressor / vLLM's format) without re-quantizing.

A compressed-tensors checkpoint is a transformers checkpoint whose config.json has
``quantization_config = {"quant_method": "compressed-tensors", "format": ..., "config_groups": {name:
{"targets": [...], "weights": {...}, "input_activations": ..., "format": ...}}, "ignore": [...],
"quantization_status": "compressed", "sparsity_config": {}, "transform_config": {}, "kv_cache_scheme": ...}``.
Each config group quantizes the modules its ``targets`` match (an exact module name, a ``"re:"`` regex
matched from the start of the name, or a class name such as "Linear"), minus those ``ignore`` matches; a
module matched by several groups takes the most specific target (exact name, then regex, then class).

Layouts read here (per quantized linear layer ``X`` [N = out, K = in]; established by experiment against
compressed-tensors 0.20.1 and transformers' loader, see tests/quant/test_quant_ctensors.py):

"float-quantized" (or "naive-quantized") fp8, weights {"type": "float", "num_bits": 8, "symmetric": true}:
    X.weight        float8_e4m3fn [N, K]
    X.weight_scale  float, multiplies: W = float(weight) * scale, with the scale of shape
                    "tensor" [1] (or []), "channel" [N, 1], "group" [N, K / group_size],
                    "block" [ceil(N / bn), ceil(K / bk)] for block_structure [bn, bk]
    -> fastpeft fp8 with scale blocks (N, K), (1, K), (1, group_size) or (bn, bk).
"int-quantized" (or "naive-quantized") int8, weights {"type": "int", "num_bits": 8, "symmetric": true}:
    X.weight int8 [N, K], X.weight_scale [N, 1] ("channel") or [1] ("tensor"): W = weight * scale
    -> fastpeft int8 (one scale per output channel; a tensor scale is repeated per channel).
"pack-quantized" int4, weights {"type": "int", "num_bits": 4, "strategy": "group" | "channel" | "tensor"}:
    X.weight_packed     int32 [N, ceil(K / 8)]: element k of row n is nibble k % 8 (bits 4(k % 8)..+3, the
                        first element in the lowest nibble) of word k // 8, stored as the unsigned code
                        u = q + 8 of the signed value q in [-8, 7]
    X.weight_shape      int [2] = [N, K]
    X.weight_scale      float [N, G] (G = K / group_size; 1 for "channel"; [1] for "tensor")
    X.weight_zero_point asymmetric only: int32 [ceil(N / 8), G], packed the same way along N (row r, nibble
                        i = output channel 8r + i), stored as zp + 8
    W = (q - zp) * scale = (u - (zp + 8)) * scale
    -> fastpeft int4 with the codes u as they are and zeros zp + 8 (8 when symmetric).
Activation quantization (input/output activations, static ``input_scale`` tensors) is not applied:
fastpeft keeps x in 16/32 bits, as transformers does when it loads such a checkpoint with
``CompressedTensorsConfig(dequantize=True)`` (the oracle of the tests); those tensors are dropped.

Refused, with an error naming the layer, the format and the file: other formats (nvfp4/mxfp4/... packed,
sparse formats, marlin-24), other bit widths, asymmetric fp8/int8, int8 groups, dynamic weight
quantization, act-order ``weight_g_idx`` (compressed-tensors 0.20 itself no longer accepts actorder
"group"), sparsity and transform (Hadamard rotation) configs, KV-cache schemes, and checkpoints whose
quantization_status is not "compressed".

Entry points:
    from_ctensors(tensors, weights, fmt, ...)        one layer from its local tensors ("weight_scale", ...)
    load_ctensors_checkpoint(model, path)            a model built from the checkpoint's config gets the
                                                     checkpoint's weights, quantized layers as QuantLinear
"""
from __future__ import annotations

import os
import re
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..utils.modules import get_submodules
from .formats import FP8_DTYPE, QuantizedWeight, pack_nibbles
from .fp8_import import config_dict, load_rest, module_for, read_checkpoint
from .importers import _nibbles_int32
from .linear import QuantLinear

METHOD = "compressed-tensors"
FP8_FORMATS = ("float-quantized", "naive-quantized")
INT8_FORMATS = ("int-quantized", "naive-quantized")
PACKED_FORMAT = "pack-quantized"
DENSE_FORMAT = "dense"
# tensors compressed-tensors stores for a layer's weight (any of them marks the layer as compressed)
WEIGHT_KEYS = ("weight_scale", "weight_packed", "weight_shape", "weight_zero_point", "weight_g_idx",
               "weight_global_scale")
# activation quantization parameters: not applied by fastpeft (module docstring), dropped
ACT_KEYS = ("input_scale", "input_zero_point", "input_global_scale", "output_scale", "output_zero_point")


class _Where:
    """Names a layer and the file its tensors came from, for error messages."""

    def __init__(self, name: str, files: dict, fmt: str = ""):
        self.name, self.files, self.fmt = name, files, fmt

    def key(self, local: str) -> str:
        k = f"{self.name}.{local}"
        # a missing tensor is named with the file holding the layer's other tensors
        near = (self.files.get(f"{self.name}.{other}") for other in ("weight", "weight_packed", "weight_scale"))
        return f"{k!r} (in {self.files.get(k) or next((f for f in near if f), '<state dict>')})"

    def err(self, local: str, msg: str) -> ValueError:
        fmt = f" [{self.fmt}]" if self.fmt else ""
        return ValueError(f"compressed-tensors import of {self.name}{fmt}: {self.key(local)} {msg}")


# -- one layer ---------------------------------------------------------------------------------------
def _get(t: dict, local: str, where: _Where) -> Tensor:
    v = t.get(local)
    if v is None:
        raise where.err(local, "is missing")
    return v


def _float_scale(t: dict, where: _Where) -> Tensor:
    s = _get(t, "weight_scale", where)
    if not s.is_floating_point() or s.dtype == FP8_DTYPE:
        raise where.err("weight_scale", f"has dtype {s.dtype}; expected a float scale (16 or 32 bits)")
    return s


def _no_zero_point(t: dict, where: _Where) -> None:
    zp = t.get("weight_zero_point")
    if zp is not None and bool((zp.float() != 0).any()):
        raise where.err("weight_zero_point", "is non-zero: asymmetric fp8/int8 weights are not supported")


def _scale_as(s: Tensor, shape: tuple, strategy: str, where: _Where, extra: str = "") -> Tensor:
    """The scale reshaped to ``shape``, after checking it has that many elements in a layout the
    strategy allows ([n, 1] or [n] for a column; [1], [] or [1, 1] for one value)."""
    ok = tuple(s.shape) == tuple(shape) or (shape[-1] == 1 and s.numel() == shape[0] and s.dim() <= 2
                                            and (s.dim() < 2 or s.shape[1] == 1))
    if not ok:
        want = f"{tuple(shape)}" + (" (or [] / [1])" if shape == (1, 1) else "")
        raise where.err("weight_scale", f"has shape {tuple(s.shape)}, expected {want} for strategy "
                                        f"{strategy!r}{extra}")
    return s.reshape(shape)


def _strategy(w: dict, where: _Where) -> str:
    st = str(w.get("strategy") or "").lower()
    if w.get("dynamic") not in (None, False, "false"):
        raise where.err("weight", f"is quantized dynamically (weights.dynamic={w.get('dynamic')!r}); only "
                                  f"static weight scales stored in the checkpoint are supported")
    if str(w.get("actorder") or "").lower() in ("group", "dynamic"):
        raise where.err("weight_g_idx", "actorder 'group' (a g_idx permutation) is not supported (nor accepted "
                                        "by compressed-tensors >= 0.20)")
    return st


def _group_size(w: dict, where: _Where) -> int:
    gs = w.get("group_size")
    if not isinstance(gs, int) or gs <= 0:
        raise where.err("weight_scale", f"strategy 'group' needs a positive group_size; got {gs!r}")
    return gs


def _from_fp8(t: dict, w: dict, N: int, K: int, where: _Where):
    q = _get(t, "weight", where)
    if q.dtype == torch.uint8:
        q = q.view(FP8_DTYPE)
    if q.dtype != FP8_DTYPE:
        raise where.err("weight", f"has dtype {q.dtype}; expected float8_e4m3fn")
    _no_zero_point(t, where)
    s = _float_scale(t, where)
    st = _strategy(w, where)
    if st == "tensor":
        bn, bk = N, K
    elif st == "channel":
        bn, bk = 1, K
    elif st == "group":
        bn, bk = 1, _group_size(w, where)
    elif st == "block":
        bs = w.get("block_structure")
        try:
            bn, bk = (int(b) for b in bs)
        except (TypeError, ValueError):
            raise where.err("weight_scale", f"strategy 'block' needs block_structure [rows, cols]; "
                                            f"got {bs!r}") from None
    else:
        raise where.err("weight_scale", f"fp8 strategy {st!r} is not supported (tensor, channel, group, block)")
    shape = (-(-N // bn), -(-K // bk))
    s = _scale_as(s, shape, st, where, f" of a weight [{N}, {K}]" + (f" in blocks [{bn}, {bk}]" if st in
                                                                     ("group", "block") else ""))
    return QuantizedWeight("fp8", N, K, q.contiguous(), s.float().contiguous(), blocksize=bk, blocksize2=bn)


def _from_int8(t: dict, w: dict, N: int, K: int, where: _Where):
    q = _get(t, "weight", where)
    if q.dtype != torch.int8:
        raise where.err("weight", f"has dtype {q.dtype}; expected int8")
    _no_zero_point(t, where)
    s = _float_scale(t, where)
    st = _strategy(w, where)
    if st == "channel":
        s = _scale_as(s, (N, 1), st, where).reshape(N)
    elif st == "tensor":
        s = _scale_as(s, (1, 1), st, where).reshape(1).expand(N)  # fastpeft int8 keeps one scale per channel
    else:
        raise where.err("weight_scale", f"int8 strategy {st!r} is not supported (fastpeft int8 has one scale "
                                        f"per output channel: 'channel' or 'tensor')")
    return QuantizedWeight("int8", N, K, q.contiguous(), s.contiguous(), blocksize=K)


def _nibbles(packed: Tensor) -> Tensor:
    """int32 [R, W] -> uint8 [R, 8 W]: element 8j + i = bits 4i..4i+3 of word j (importers' unpacking, flat)."""
    return _nibbles_int32(packed).reshape(packed.shape[0], -1).to(torch.uint8)


def _from_int4(t: dict, w: dict, N: int, K: int, where: _Where):
    p = _get(t, "weight_packed", where)
    if p.dtype != torch.int32 or tuple(p.shape) != (N, -(-K // 8)):
        raise where.err("weight_packed", f"is {p.dtype} {tuple(p.shape)}; expected int32 {(N, -(-K // 8))} "
                                         f"for a weight [{N}, {K}] (8 int4 values per word)")
    shp = t.get("weight_shape")
    if shp is not None and [int(v) for v in shp.reshape(-1)] != [N, K]:
        raise where.err("weight_shape", f"is {[int(v) for v in shp.reshape(-1)]}; the model's layer is [{N}, {K}]")
    s = _float_scale(t, where)
    st = _strategy(w, where)
    if st == "group":
        gs = _group_size(w, where)
    elif st in ("channel", "tensor"):
        gs = K
    else:
        raise where.err("weight_scale", f"int4 strategy {st!r} is not supported (group, channel, tensor)")
    G = -(-K // gs)
    if st == "tensor":
        s = _scale_as(s, (1, 1), st, where).expand(N, 1)
    else:
        s = _scale_as(s, (N, G), st, where, f" (K={K}, group_size={gs})")
    codes = _nibbles(p)[:, :K]                                  # u = q + 8, as stored
    if w.get("symmetric", True):
        zeros = torch.full((N, G), 8, dtype=torch.uint8, device=p.device)
    else:
        if st == "tensor":
            raise where.err("weight_zero_point", "asymmetric 'tensor' int4 is not supported")
        zp = _get(t, "weight_zero_point", where)
        if zp.dtype != torch.int32 or tuple(zp.shape) != (-(-N // 8), G):
            raise where.err("weight_zero_point", f"is {zp.dtype} {tuple(zp.shape)}; expected int32 "
                                                 f"{(-(-N // 8), G)} (packed along N)")
        zeros = _nibbles(zp.t().contiguous())[:, :N].t()            # zp + 8, as stored
    return QuantizedWeight("int4", N, K, pack_nibbles(codes).contiguous(), s.contiguous(), zeros.contiguous(),
                           blocksize=gs)


def from_ctensors(tensors: dict, weights: dict, fmt: str, shape: tuple, bias: Optional[Tensor] = None,
                  compute_dtype: Optional[torch.dtype] = None, name: str = "layer",
                  files: Optional[dict] = None) -> QuantLinear:
    """A QuantLinear from one compressed-tensors layer (layouts in the module docstring).

    tensors: the layer's tensors by local name ("weight" or "weight_packed", "weight_scale", ...);
    weights: its config group's ``weights`` arguments (a dict); fmt: the group's format; shape: the
    layer's [out, in]; compute_dtype: the layer's dtype (default the scale's). name / files (full
    key -> file) only make the errors name the key and the file.
    """
    where = _Where(name, files or {}, fmt)
    if hasattr(weights, "model_dump"):  # a compressed_tensors QuantizationArgs
        weights = weights.model_dump()
    N, K = (int(v) for v in shape)
    for k in ("weight_g_idx", "weight_global_scale"):
        if k in tensors:
            raise where.err(k, "is present: act-order g_idx and global scales (nvfp4) are not supported")
    kind, bits = str(weights.get("type", "int")).lower(), int(weights.get("num_bits", 0) or 0)
    if fmt in FP8_FORMATS and kind == "float" and bits == 8:
        qw = _from_fp8(tensors, weights, N, K, where)
    elif fmt in INT8_FORMATS and kind == "int" and bits == 8:
        qw = _from_int8(tensors, weights, N, K, where)
    elif fmt == PACKED_FORMAT and kind == "int" and bits == 4:
        qw = _from_int4(tensors, weights, N, K, where)
    else:
        raise where.err("weight", f"uses format {fmt!r} with {kind} {bits}-bit weights; fastpeft imports "
                                  f"float-quantized fp8, int-quantized int8 and pack-quantized int4")
    cdt = compute_dtype or tensors["weight_scale"].dtype
    if bias is not None and tuple(bias.shape) != (N,):
        raise where.err("bias", f"has shape {tuple(bias.shape)}, expected ({N},)")
    return QuantLinear.from_quantized(qw, bias.to(cdt) if bias is not None else None, compute_dtype=cdt)


# -- the config ---------------------------------------------------------------------------------------
def check_config(cfg: dict, source: str) -> None:
    """Refuse the checkpoint-wide features fastpeft does not honour (module docstring)."""
    if str(cfg.get("quant_method", "")).lower() != METHOD:
        raise ValueError(f"{source}: quantization_config has quant_method {cfg.get('quant_method')!r}, "
                         f"not {METHOD!r}")
    status = str(cfg.get("quantization_status", "compressed")).lower()
    if status != "compressed":
        raise ValueError(f"{source}: quantization_status is {status!r}; only 'compressed' checkpoints are "
                         f"imported (the weights of other states are not stored packed)")
    for key, what in (("sparsity_config", "sparsity compression"), ("transform_config", "transforms (rotations)"),
                      ("kv_cache_scheme", "KV-cache quantization")):
        if cfg.get(key):
            raise ValueError(f"{source}: quantization_config.{key} is set ({what}); not supported by fastpeft's "
                             f"compressed-tensors importer")
    if not isinstance(cfg.get("config_groups"), dict) or not cfg["config_groups"]:
        raise ValueError(f"{source}: quantization_config has no config_groups")


def _name_match(name: str, target: str) -> bool:
    return re.match(target[3:], name) is not None if target.startswith("re:") else target == name


def _class_match(module: Optional[nn.Module], target: str) -> bool:
    return module is not None and any(c.__name__ == target for c in type(module).__mro__)


def scheme_of(cfg: dict, name: str, module: Optional[nn.Module]) -> Optional[tuple[str, dict]]:
    """(group name, group) quantizing the module ``name`` under compressed-tensors' matching rules, or None
    (no target matches, or ignored). Targets of later groups replace equal targets of earlier ones; among
    the matching targets the exact name wins, then the regexes (in sorted order), then class names."""
    ignore = cfg.get("ignore") or []
    if any(_name_match(name, t) or _class_match(module, t) for t in ignore):
        return None
    by_target = {}
    for gname, group in cfg["config_groups"].items():
        for t in group.get("targets") or []:
            by_target[t] = (gname, group)
    ordered = sorted(by_target, key=lambda t: (t.startswith("re:"), t))
    hits = [t for t in ordered if _name_match(name, t)] + [t for t in ordered if _class_match(module, t)]
    return by_target[hits[0]] if hits else None


def _format_of(cfg: dict, gname: str, group: dict, source: str) -> str:
    fmt = group.get("format") or cfg.get("format")
    if not fmt or fmt == "mixed-precision":
        raise ValueError(f"{source}: config group {gname!r} has no format (the checkpoint's format is "
                         f"{cfg.get('format')!r})")
    return str(fmt)


# -- a checkpoint ----------------------------------------------------------------------------------------
def load_ctensors_checkpoint(model: nn.Module, checkpoint: Union[str, dict], quantization_config=None,
                             strict: bool = True) -> list[str]:
    """Load a compressed-tensors checkpoint into ``model`` (built from its config with float weights), in
    place: each layer a config group quantizes becomes a QuantLinear (fp8, int8 or int4, in the layer's
    dtype) holding the checkpoint's codes and scales; ignored layers and every other tensor load as usual.
    Returns the names of the quantized layers.

    checkpoint: a directory (config.json + *.safetensors, as save_pretrained writes) or a state dict (then
    quantization_config is required). strict: as load_state_dict's, for the remaining tensors.
    """
    if isinstance(checkpoint, str):
        sd, files, config = read_checkpoint(checkpoint)
        source = os.path.join(checkpoint, "config.json")
        quantization_config = quantization_config or config.get("quantization_config")
        if quantization_config is None:
            raise ValueError(f"{source} has no quantization_config: not a compressed-tensors checkpoint")
    else:
        sd, files, source = dict(checkpoint), {}, "quantization_config"
        if quantization_config is None:
            raise ValueError("load_ctensors_checkpoint with a state dict needs quantization_config")
    cfg = config_dict(quantization_config)
    check_config(cfg, source)
    modules = dict(model.named_modules())
    # every checkpoint prefix with a weight: compressed (a WEIGHT_KEYS tensor next to it) or plain
    prefixes = {}
    for k in sd:
        head, _, local = k.rpartition(".")
        if local in WEIGHT_KEYS or local == "weight":
            prefixes.setdefault(head, set()).add(local)
    done = []
    for prefix, locals_ in sorted(prefixes.items()):
        name = module_for(prefix, modules)
        mod = modules.get(name) if name is not None else None
        hit = scheme_of(cfg, prefix, mod)
        compressed = bool(locals_ & set(WEIGHT_KEYS))
        where = _Where(prefix, files)
        if compressed and (not isinstance(mod, nn.Linear) or isinstance(mod, QuantLinear)):
            raise where.err(sorted(locals_ & set(WEIGHT_KEYS))[0],
                            f"is a quantized tensor, but the model has no nn.Linear {prefix!r} (found "
                            f"{type(mod).__name__ if mod is not None else 'nothing'}); only linear layers are imported")
        if hit is None or not hit[1].get("weights"):
            if compressed:
                raise where.err(sorted(locals_ & set(WEIGHT_KEYS))[0],
                                "is a quantized tensor, but quantization_config does not quantize this layer's "
                                "weight (no config group targets it, or it is ignored)")
            continue
        gname, group = hit
        fmt = _format_of(cfg, gname, group, source)
        if fmt == DENSE_FORMAT or (not compressed and not isinstance(mod, nn.Linear)):
            continue  # compressed-tensors quantizes only linear (and embedding) layers a target matches
        where.fmt = fmt
        if "weight_scale" not in locals_:
            raise where.err("weight_scale", f"is missing: config group {gname!r} quantizes this layer "
                                            f"(targets {group.get('targets')})")
        local = {k: sd.pop(f"{prefix}.{k}") for k in list(locals_)}
        bias = sd.pop(prefix + ".bias", None)
        if (bias is None) != (mod.bias is None):
            raise where.err("bias", f"is {'missing' if bias is None else 'present'}; the model's {name} has "
                                    f"{'one' if mod.bias is not None else 'none'}")
        dt = mod.weight.dtype if mod.weight.is_floating_point() else torch.bfloat16
        q = from_ctensors(local, dict(group["weights"]), fmt, (mod.out_features, mod.in_features), bias,
                          compute_dtype=dt, name=prefix, files=files)
        parent, _, attr = get_submodules(model, name)
        setattr(parent, attr, q.to(mod.weight.device))
        modules[name] = q
        done.append(name)
    # activation quantization parameters of the layers a config group covers: not applied (docstring)
    for k in [k for k in sd if k.rpartition(".")[2] in ACT_KEYS]:
        prefix = k.rpartition(".")[0]
        name = module_for(prefix, modules)
        if scheme_of(cfg, prefix, modules.get(name) if name is not None else None) is not None:
            del sd[k]
    if not done:
        raise ValueError(f"{source}: no layer of the checkpoint is quantized by its config groups")
    load_rest(model, sd, done, strict, "load_ctensors_checkpoint", lambda k: f"{k} (in {files.get(k, source)})")
    return done
