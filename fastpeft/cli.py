"""The `fastpeft` command.

  fastpeft bench   [--device cuda] [--json PATH] ...   fastpeft vs. HF peft vs. base, side by side
  fastpeft inspect PATH                                an adapter folder's config and tensors
  fastpeft merge   BASE ADAPTER OUT                    base model + adapter -> merged model folder

Also reachable as `python -m fastpeft ...`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import List, Optional

from fastpeft.config import CONFIG_NAME
from fastpeft.utils.atomic import atomic_folder
from fastpeft.utils.save_and_load import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from fastpeft.utils.tasks import TASKS

WEIGHTS_NAMES = (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)

# Files a model folder carries besides what save_pretrained writes; merge copies them along so the
# merged folder loads with its tokenizer like the base did.
_COPY_ALONG_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab.", "merges.txt", "chat_template",
                        "preprocessor_config", "processor_config", "spiece.model", "sentencepiece")


class CliError(Exception):
    """An error the user can fix; printed without a traceback."""


# ----------------------------------------------------------------------------------------------- bench
def _parse_ranks(values: Optional[List[str]]) -> Optional[List[int]]:
    if not values:
        return None
    out = []
    for v in values:
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                r = int(part)
            except ValueError:
                raise CliError(f"--rank expects integers (e.g. 16 or 16,64), got {part!r}") from None
            if r < 1:
                raise CliError(f"--rank must be >= 1, got {r}")
            out.append(r)
    return out


def _parse_shapes(text: Optional[str]) -> Optional[List[tuple]]:
    if not text:
        return None
    shapes = []
    for part in text.split(","):
        dims = part.strip().lower().split("x")
        try:
            M, K, N = (int(d) for d in dims)
        except ValueError:
            raise CliError(f"--layer-shapes expects MxKxN[,MxKxN...] (e.g. 512x1024x1024), got {part!r}") from None
        if min(M, K, N) < 1:
            raise CliError(f"--layer-shapes: dimensions must be >= 1, got {part!r}")
        shapes.append((M, K, N))
    return shapes


def cmd_bench(args) -> int:
    if args.backend:
        # Read by fastpeft.ops at dispatch time; set before anything runs.
        os.environ["FASTPEFT_BACKEND"] = args.backend
    from fastpeft.bench.models import BenchSetupError
    from fastpeft.bench.runner import BenchOptions, format_table, run

    if args.threads is not None:
        if args.threads < 1:
            raise CliError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)

    if not 0.0 <= args.dropout < 1.0:
        raise CliError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.repeats is not None and args.repeats < 1:
        raise CliError(f"--repeats must be >= 1, got {args.repeats}")
    if args.fsdp2_nproc < 1:
        raise CliError(f"--fsdp2-nproc must be >= 1, got {args.fsdp2_nproc}")
    if args.mixed_adapters is not None and args.mixed_adapters < 1:
        raise CliError(f"--mixed-adapters must be >= 1, got {args.mixed_adapters}")
    opts = BenchOptions(device=args.device, dtype=args.dtype, ranks=_parse_ranks(args.rank), dropout=args.dropout,
                        repeats=args.repeats, warmup=args.warmup, quick=args.quick,
                        layer_shapes=_parse_shapes(args.layer_shapes), only=args.only, seed=args.seed,
                        json_path=args.json, progress=not args.no_progress, fsdp2=args.fsdp2,
                        fsdp2_nproc=args.fsdp2_nproc, dora=args.dora, mixed=args.mixed,
                        mixed_adapters=args.mixed_adapters)
    try:
        result = run(opts)
    except BenchSetupError as e:
        raise CliError(str(e)) from e
    print(format_table(result))
    if args.json:
        print(f"wrote {os.path.abspath(args.json)}")
    return 0


# --------------------------------------------------------------------------------------------- inspect
def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CliError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise CliError(f"{path}: not a UTF-8 text file ({e})") from None
    if not isinstance(data, dict):
        raise CliError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _find_adapter_files(path: str):
    """(config path, weights path or None) for an adapter folder, with errors that say what is wrong."""
    if not os.path.exists(path):
        raise CliError(f"{path}: no such folder")
    if not os.path.isdir(path):
        raise CliError(f"{path}: is a file; expected an adapter folder holding {CONFIG_NAME}")
    cfg = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg):
        subs = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, CONFIG_NAME)))
        hint = f"; adapters found in subfolders: {', '.join(subs)} (pass one of them)" if subs else ""
        raise CliError(f"{path}: no {CONFIG_NAME} in this folder{hint}")
    for name in WEIGHTS_NAMES:
        w = os.path.join(path, name)
        if os.path.isfile(w):
            return cfg, w
    return cfg, None


def _tensor_table(weights: str) -> List[tuple]:
    """[(name, shape, dtype)] without loading the tensor data where the format allows."""
    if weights.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            rows = []
            with safe_open(weights, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    rows.append((name, tuple(sl.get_shape()), str(sl.get_dtype())))
            return rows
        except Exception as e:  # SafetensorError and OSError both mean: this file cannot be read
            raise CliError(f"{weights}: corrupt or not a safetensors file ({type(e).__name__}: {e})") from None
    import torch

    try:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CliError(f"{weights}: cannot be read as a torch state dict ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict):
        raise CliError(f"{weights}: expected a dict of tensors, found {type(sd).__name__}")
    return [(k, tuple(v.shape), str(v.dtype).replace("torch.", "").upper()) for k, v in sd.items()]


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "FLOAT32": 4, "FLOAT16": 2, "BFLOAT16": 2, "FLOAT64": 8, "INT64": 8,
                "INT32": 4, "INT8": 1, "UINT8": 1}


def _rank_checks(cfg: dict, rows: List[tuple]) -> List[str]:
    """Warnings where lora_A/lora_B pairs disagree with each other or with the config's rank."""
    shapes = {n: s for n, s, _ in rows}
    warnings = []
    default_r = cfg.get("r")
    pattern = cfg.get("rank_pattern") or {}
    for name, shape in shapes.items():
        if ".lora_A." not in name and not name.endswith(".lora_A.weight"):
            continue
        partner = name.replace(".lora_A.", ".lora_B.")
        module = name.split(".lora_A.")[0]
        if partner not in shapes:
            warnings.append(f"{name} has no matching {partner}")
            continue
        ra, rb = shape[0], shapes[partner][1] if len(shapes[partner]) > 1 else None
        if ra != rb:
            warnings.append(f"{module}: lora_A rank {ra} != lora_B rank {rb}")
        # rank_pattern keys name a module by its full name or a dotted suffix of it.
        expected = next((v for k, v in pattern.items() if module == k or module.endswith("." + k)), default_r)
        if isinstance(expected, int) and ra != expected:
            warnings.append(f"{module}: rank {ra} in the weights, config says r={expected}")
    return warnings


def cmd_inspect(args) -> int:
    cfg_path, weights = _find_adapter_files(args.path)
    cfg = _read_json(cfg_path)
    if "peft_type" not in cfg:
        raise CliError(f"{cfg_path}: no 'peft_type' field; this is not a peft/fastpeft adapter config")
    out = [f"adapter folder: {os.path.abspath(args.path)}"]
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    shown = ["peft_type", "task_type", "base_model_name_or_path", "revision", "r", "lora_alpha", "lora_dropout",
             "target_modules", "bias", "modules_to_save", "use_rslora", "use_dora", "init_lora_weights",
             "fan_in_fan_out", "layers_to_transform", "rank_pattern", "alpha_pattern", "inference_mode",
             "peft_version"]
    for key in shown:
        if key in cfg and cfg[key] not in (None, {}, []):
            out.append(f"  {key:<24} {json.dumps(cfg[key]) if not isinstance(cfg[key], str) else cfg[key]}")
    if isinstance(r, (int, float)) and isinstance(alpha, (int, float)) and r > 0:
        scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
        out.append(f"  {'scaling':<24} {scale:g}  ({'alpha/sqrt(r)' if cfg.get('use_rslora') else 'alpha/r'})")
    others = sorted(k for k in cfg if k not in shown and cfg[k] not in (None, False, {}, [], ""))
    if others:
        out.append(f"  other set fields: {', '.join(others)}")
    if weights is None:
        out.append(f"weights: none found ({' or '.join(WEIGHTS_NAMES)} missing)")
        print("\n".join(out))
        raise CliError(f"{args.path}: no adapter weights ({' or '.join(WEIGHTS_NAMES)})")
    rows = _tensor_table(weights)
    n_params = 0
    n_bytes = 0
    for _, shape, dt in rows:
        numel = 1
        for d in shape:
            numel *= d
        n_params += numel
        n_bytes += numel * _DTYPE_BYTES.get(dt.upper(), 0)
    size = f"{n_bytes / 2 ** 20:.2f} MiB" if n_bytes >= 2 ** 20 else f"{n_bytes / 2 ** 10:.1f} KiB"
    out.append(f"weights: {os.path.basename(weights)}  {len(rows)} tensors, {n_params:,} parameters, {size}")
    width = max((len(n) for n, _, _ in rows), default=4)
    shown_rows = rows if args.all or len(rows) <= args.limit else rows[:args.limit]
    for name, shape, dt in shown_rows:
        out.append(f"  {name:<{width}}  {str(list(shape)):<16} {dt}")
    if len(shown_rows) < len(rows):
        out.append(f"  ... {len(rows) - len(shown_rows)} more (use --all)")
    warnings = _rank_checks(cfg, rows)
    for w in warnings:
        out.append(f"warning: {w}")
    print("\n".join(out))
    return 0


# ----------------------------------------------------------------------------------------------- merge
def _model_class(base: str, adapter_cfg: dict, override: Optional[str]):
    import transformers

    task = TASKS.get(str(adapter_cfg.get("task_type") or "").upper())
    name = override or (task.auto_class if task else None)
    if name is None:
        # No task type: the adapter was made on whatever class the user wrapped; the base config's first
        # architecture is the best guess, since adapter keys name modules of that class.
        archs = _read_json(os.path.join(base, "config.json")).get("architectures") or []
        name = archs[0] if archs and hasattr(transformers, archs[0]) else "AutoModel"
    cls = getattr(transformers, name, None)
    if cls is None:
        raise CliError(f"--auto-class {name!r} is not a class in transformers {transformers.__version__}")
    return cls


def _num_labels_from_adapter(weights: Optional[str]) -> Optional[int]:
    if weights is None:
        return None
    for name, shape, _ in _tensor_table(weights):
        if name.endswith((".score.weight", ".classifier.weight", ".classifier.out_proj.weight")) and shape:
            return int(shape[0])
    return None


def _save_merged(model, base: str, out: str, force: bool) -> None:
    """Save the merged model and the base's tokenizer files into OUT as one atomic folder swap."""
    try:
        with atomic_folder(out, overwrite=force) as tmp:
            model.save_pretrained(tmp)
            for f in sorted(os.listdir(base)):
                src, dst = os.path.join(base, f), os.path.join(tmp, f)
                if os.path.isfile(src) and f.startswith(_COPY_ALONG_PREFIXES) and not os.path.exists(dst):
                    shutil.copy2(src, dst)
    except FileExistsError as e:
        if e.filename != os.path.abspath(out):
            raise
        raise CliError(f"{e.filename} already exists (use --force to replace it)") from None


def _load_base(cls, base: str, dtype: str, num_labels: Optional[int]):
    kw = {"local_files_only": True}
    if dtype != "auto":
        from fastpeft.bench.models import parse_dtype

        kw["dtype"] = parse_dtype(dtype)
    else:
        kw["dtype"] = "auto"
    if num_labels is not None:
        kw["num_labels"] = num_labels
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        kw["torch_dtype"] = kw.pop("dtype")  # the older name of the same argument
    try:
        return cls.from_pretrained(base, **kw)
    except (OSError, ValueError) as e:
        raise CliError(f"cannot load the base model from {base} with {cls.__name__}: {e}") from None


def _peft_model_class():
    try:
        from fastpeft import PeftModel  # type: ignore[attr-defined]
        return PeftModel
    except ImportError:
        pass
    try:
        from fastpeft.peft_model import PeftModel
    except ImportError as e:
        raise CliError(f"fastpeft merge needs fastpeft.peft_model.PeftModel, which failed to import: {e}") from e
    return PeftModel


def cmd_merge(args) -> int:
    base, adapter, out = args.base, args.adapter, args.out
    if not os.path.isdir(base):
        raise CliError(f"{base}: no such folder (BASE must be a local transformers model folder)")
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise CliError(f"{base}: no config.json; BASE must be a transformers model folder (save_pretrained output)")
    cfg_path, weights = _find_adapter_files(adapter)
    if weights is None:
        raise CliError(f"{adapter}: no adapter weights ({' or '.join(WEIGHTS_NAMES)})")
    adapter_cfg = _read_json(cfg_path)
    if os.path.exists(out) and not args.force:
        raise CliError(f"{out} already exists (use --force to replace it)")
    if os.path.abspath(out) in (os.path.abspath(base), os.path.abspath(adapter)):
        raise CliError(f"OUT must differ from BASE and ADAPTER, got {out}")
    cls = _model_class(base, adapter_cfg, args.auto_class)
    num_labels = None
    if str(adapter_cfg.get("task_type") or "").upper() in ("SEQ_CLS", "TOKEN_CLS"):
        num_labels = _num_labels_from_adapter(weights)
    model = _load_base(cls, base, args.dtype, num_labels)
    PeftModel = _peft_model_class()
    peft_model = PeftModel.from_pretrained(model, adapter)
    merged = peft_model.merge_and_unload(safe_merge=args.safe_merge)
    _save_merged(merged, base, out, args.force)
    print(f"merged adapter {os.path.abspath(adapter)} (targets: {adapter_cfg.get('target_modules')}) into "
          f"{cls.__name__} from {os.path.abspath(base)}; saved to {os.path.abspath(out)}")
    return 0


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastpeft", description="fastpeft command line tools")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    b = sub.add_parser("bench", help="time fastpeft vs. HF peft vs. the base model, side by side",
                       description="Forward, forward+backward and bytes saved for backward of one LoRA linear "
                                   "layer and a small Llama-style decoder, for fastpeft, HF peft (same config, "
                                   "same weights) and the frozen base model alone, in one process.")
    b.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available; default)")
    b.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp32 on CPU, bf16 on CUDA)")
    b.add_argument("--rank", action="append", default=None,
                   help="LoRA rank(s), repeatable or comma-separated (default 16 on CPU, 16,64 on CUDA)")
    b.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout (default 0.1)")
    b.add_argument("--repeats", type=int, default=None, help="timed runs per measurement, median reported (the decoder takes half, at least 3; on "
                        "CUDA do_bench sizes its loop to about this many runs)")
    b.add_argument("--warmup", type=int, default=None, help="untimed runs before timing")
    b.add_argument("--quick", action="store_true", help="tiny shapes and 3 repeats (a few seconds; for tests)")
    b.add_argument("--layer-shapes", default=None, help="layer shapes MxKxN[,MxKxN...] instead of the defaults")
    b.add_argument("--only", choices=("layer", "decoder", "fsdp2", "dora", "mixed"), default=None,
                   help="run only one of the benches (fsdp2: only the FSDP2 row; dora: only the DoRA section; "
                        "mixed: only the mixed-batch section)")
    b.add_argument("--dora", action="store_true",
                   help="add the DoRA section: base, fastpeft LoRA, fastpeft DoRA, peft LoRA, peft DoRA "
                        "(use_dora=True, same A and B), timed round-robin in one process, for one layer "
                        "(CPU: M=K=N=2048 fp32; CUDA: M=K=N=4096 bf16; r=16; --layer-shapes and --rank apply "
                        "too) and the decoder's training step, at the run's --dropout: DoRA/LoRA ratios, DoRA's "
                        "extra cost per library, bytes saved for backward")
    b.add_argument("--mixed", action="store_true",
                   help="add the mixed-batch section: many adapters in one batch (adapter_names=[...]), eval mode; "
                        "base, fastpeft and peft with 8 adapters (CUDA: 64) and with one adapter for all rows, and "
                        "fastpeft with ranks 8/16/32/64 vs all rank 30, timed round-robin in one process, for one "
                        "layer call (CPU: M=32 K=N=1024 fp32; CUDA: M=64 K=N=4096 bf16; r=16; --layer-shapes "
                        "and --rank apply) and on CPU a decode step of the decoder (batch 32, KV cache of a "
                        "16-token prompt): adapter work (row minus base) and its ratios")
    b.add_argument("--mixed-adapters", type=int, default=None, metavar="N",
                   help="distinct adapters of the --mixed rows (default 8 on CPU, 64 on CUDA)")
    b.add_argument("--fsdp2", action="store_true",
                   help="add an FSDP2 row: per-rank step time and peak memory, fastpeft vs peft, each under its own "
                        "torchrun launch (CPU: gloo; CUDA: one GPU per rank); not in the default run")
    b.add_argument("--fsdp2-nproc", type=int, default=2, help="ranks of the FSDP2 row (default 2)")
    b.add_argument("--backend", choices=("torch", "triton", "cuda"), default=None,
                   help="force a fastpeft.ops backend (sets FASTPEFT_BACKEND)")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch.set_num_threads)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", default=None, metavar="PATH", help="write all numbers and the environment to PATH")
    b.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("inspect", help="show an adapter folder's config and tensors")
    i.add_argument("path", help="folder with adapter_config.json and adapter_model.safetensors")
    i.add_argument("--all", action="store_true", help="list every tensor")
    i.add_argument("--limit", type=int, default=40, help="list at most this many tensors (default 40)")
    i.set_defaults(func=cmd_inspect)

    m = sub.add_parser("merge", help="merge an adapter into its base model and save the result",
                       description="Loads BASE (a local transformers model folder), applies ADAPTER, merges it "
                                   "into the base weights (merge_and_unload) and saves to OUT atomically.")
    m.add_argument("base")
    m.add_argument("adapter")
    m.add_argument("out")
    m.add_argument("--dtype", default="auto", help="auto (as saved), fp32, fp16 or bf16")
    m.add_argument("--auto-class", default=None,
                   help="transformers class to load BASE with (default: from the adapter's task_type, else the "
                        "base config's architecture)")
    m.add_argument("--safe-merge", action="store_true", help="check merged weights for NaN/inf before writing")
    m.add_argument("--force", action="store_true", help="replace OUT if it exists")
    m.set_defaults(func=cmd_merge)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        print(f"fastpeft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastpeft {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
