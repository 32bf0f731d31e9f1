"""What the distributed worker scripts share: the model, the single-process reference, the engines, the
checks' bookkeeping. Imported by scripts that torchrun starts (not by pytest; see test_engines.py).

Every check compares a run under an engine (2 ranks, gloo, CPU) against one process training the same
model on the whole batch: the loss of every step, the full gradients of lora_A / lora_B after the first
backward, the parameters after STEPS AdamW steps. Each rank trains on its half of the batch; the tiny
llama's loss is a mean over tokens and every row has the same number of tokens, so the mean of the two
ranks' losses (and gradients) is the whole batch's.

Engine bugs are told apart from library bugs by a canary: a plain nn.Linear trained under the same
engine. FSDP2 over gloo sums gradients instead of averaging them in some torch versions (tracked
upstream); when the canary's gradient comes out ``world`` times the single-process one, the LoRA
gradients are divided by that factor IN THE TEST before comparing and stepping (``Run.grad_factor``).
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path.insert(0, TESTS)  # _support
sys.path.insert(0, os.path.dirname(TESTS))  # fastpeft from the checkout, like pytest

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from _support.models import VOCAB, tiny_model  # noqa: E402

KIND = "llama"
TARGETS = ["q_proj", "v_proj", "down_proj"]
BATCH, SEQ = 4, 8        # the whole batch; each of the 2 ranks gets BATCH // 2 rows
STEPS, LR = 3, 1e-2
# fp32: the engine's sums run in a different order than one process's; nothing else differs
FP32 = dict(rtol=1e-4, atol=1e-6)
# bf16 compute: the gradients within bf16 rounding; parameters within one AdamW step (LR)
BF16 = dict(rtol=3e-2, atol=3e-3)
BF16_PARAMS = dict(rtol=0.0, atol=LR)


# ----------------------------------------------------------------------------------------------------
# process group and results
# ----------------------------------------------------------------------------------------------------
def init(backend: str = "gloo") -> tuple[int, int]:
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))
    return dist.get_rank(), dist.get_world_size()


class Results:
    """Per-rank check results, written as JSON to ``<out>/rank<r>.json`` (read by test_engines.py)."""

    def __init__(self, out: str):
        self.rank = dist.get_rank()
        self.out = out
        self.checks: dict = {}
        os.makedirs(out, exist_ok=True)

    def run(self, name: str, fn, *args, **kwargs) -> None:
        info: dict = {}
        try:
            got = fn(*args, **kwargs)
            info = got if isinstance(got, dict) else {}
            self.checks[name] = {"ok": True, "info": info}
        except NotSupported as exc:
            self.checks[name] = {"ok": None, "error": str(exc)}
        except Exception as exc:  # recorded; the pytest side reports it
            self.checks[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc()[-4000:]}
            print(f"[rank {self.rank}] {name} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        self.save()
        dist.barrier()

    def save(self) -> None:
        with open(os.path.join(self.out, f"rank{self.rank}.json"), "w") as fh:
            json.dump(self.checks, fh, indent=1, default=str)

    def finish(self) -> int:
        self.save()
        dist.barrier()
        dist.destroy_process_group()
        return 0 if all(c["ok"] is not False for c in self.checks.values()) else 1


class NotSupported(Exception):
    """A combination the library refuses on purpose (recorded as such, not as a failure)."""


# ----------------------------------------------------------------------------------------------------
# the model, the batch, the single-process reference
# ----------------------------------------------------------------------------------------------------
def lora_kwargs(**kw) -> dict:
    return dict(dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, lora_dropout=0.0,
                     task_type="CAUSAL_LM"), **kw)


def build(checkpointing=None, quantized: bool = False, model_kw: dict = None, **kw):
    """fastpeft PeftModel on the tiny llama; the same weights on every rank and in every call.

    checkpointing: None, "reentrant" or "non_reentrant" (transformers' gradient_checkpointing_enable), or
    "wrapper" (torch's apply_activation_checkpointing: each block in a CheckpointWrapper, whose
    ``_checkpoint_wrapped_module.`` shows in module names).
    quantized: every nn.Linear of the blocks as an nf4 QuantLinear (QLoRA)."""
    import fastpeft

    base = tiny_model(KIND, **(model_kw or {}))
    if quantized:
        fastpeft.quantize(base, "nf4", blocksize=64, skip_modules=["lm_head"], progressbar=False)
    if checkpointing in ("reentrant", "non_reentrant"):
        base.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    torch.manual_seed(1)  # the adapters' random init
    pm = fastpeft.get_peft_model(base, fastpeft.LoraConfig(**lora_kwargs(**kw)))
    if checkpointing == "wrapper":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (apply_activation_checkpointing,
                                                                                 checkpoint_wrapper)

        block = type(base.model.layers[0])
        apply_activation_checkpointing(pm, checkpoint_wrapper_fn=checkpoint_wrapper,
                                       check_fn=lambda m: isinstance(m, block))
    return pm


def full_batch() -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def local_batch(rank: int, world: int) -> dict:
    per = BATCH // world
    return {k: v[rank * per:(rank + 1) * per] for k, v in full_batch().items()}


def canonical(name: str) -> str:
    from fastpeft.utils.save_and_load import canonical_key

    return canonical_key(name)


def trainable(model: nn.Module) -> dict:
    return {canonical(n): p for n, p in model.named_parameters() if p.requires_grad}


def adamw(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.0)


def reference(build_kw: dict = None, steps: int = STEPS, autocast=None, seed=None, cast=None) -> dict:
    """One process, the whole batch: losses per step, gradients after the first backward, parameters
    after ``steps`` AdamW steps, and the trained model. ``cast``: the model's dtype (mixed precision
    reference: the engine computes in that dtype, keeps fp32 masters)."""
    pm = build(**(build_kw or {}))
    pm.train()
    params = trainable(pm)
    if cast is not None:
        master = {n: p.detach().clone() for n, p in params.items()}
        pm.to(cast)
    opt = adamw(list(master.values()) if cast is not None else list(params.values()))
    batch = full_batch()
    losses, grads0 = [], None
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        if seed is not None:
            torch.manual_seed(seed)
        with _autocast(autocast):
            loss = pm(**batch).loss
        loss.backward()
        if cast is not None:
            for n, p in params.items():
                master[n].grad = p.grad.float()
                p.grad = None
        grads = {n: (master[n] if cast is not None else p).grad.detach().clone() for n, p in params.items()}
        if step == 0:
            grads0 = grads
        opt.step()
        if cast is not None:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(master[n])
        losses.append(loss.item())
    final = {n: (master[n] if cast is not None else p).detach().clone() for n, p in params.items()}
    return {"losses": losses, "grads0": grads0, "params": final, "model": pm}


def _autocast(dtype):
    if dtype is None:
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cpu", dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# engines
# ----------------------------------------------------------------------------------------------------
class Run:
    """A model under one engine: forward/backward/step plus full (gathered) gradients and parameters.

    ``model`` is what forward is called on, ``peft`` the fastpeft PeftModel inside it."""

    engine = "?"

    def __init__(self, peft):
        self.peft = peft
        self.model = peft
        self.grad_factor = 1.0  # set from the canary: divide gradients by it (see module docstring)
        self.opt = None

    # hooks
    def forward(self, batch, autocast=None):
        with _autocast(autocast):
            return self.model(**batch).loss

    def backward(self, loss):
        loss.backward()

    def fix_grads(self):
        if self.grad_factor != 1.0:
            for p in trainable(self.peft).values():
                if p.grad is not None:
                    p.grad.div_(self.grad_factor)

    def step(self):
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def full_grads(self) -> dict:
        raise NotImplementedError

    def full_params(self, only_trainable: bool = True) -> dict:
        raise NotImplementedError


def _named(model, only_trainable):
    return {canonical(n): p for n, p in model.named_parameters() if p.requires_grad or not only_trainable}


class DDPRun(Run):
    engine = "ddp"

    def __init__(self, peft):
        from torch.nn.parallel import DistributedDataParallel as DDP

        super().__init__(peft)
        self.model = DDP(peft)
        self.opt = adamw(list(trainable(peft).values()))

    def full_grads(self):
        return {n: p.grad.detach().clone() for n, p in trainable(self.peft).items()}

    def full_params(self, only_trainable=True):
        return {n: p.detach().clone() for n, p in _named(self.peft, only_trainable).items()}


def fsdp2_wrap(peft, mp=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    kw = {"mesh": mesh}
    if mp is not None:
        kw["mp_policy"] = mp
    for layer in peft.get_base_model().model.layers:
        fully_shard(layer, **kw)
    fully_shard(peft, **kw)
    return peft


class FSDP2Run(Run):
    engine = "fsdp2"

    def __init__(self, peft, mp=None):
        super().__init__(fsdp2_wrap(peft, mp))
        self.opt = adamw(list(trainable(peft).values()))

    def full_grads(self):
        return {n: p.grad.full_tensor().detach().clone() for n, p in trainable(self.peft).items()}

    def full_params(self, only_trainable=True):
        return {n: p.full_tensor().detach().clone() for n, p in _named(self.peft, only_trainable).items()}


class FSDP1Run(Run):
    engine = "fsdp1"

    def __init__(self, peft):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        super().__init__(peft)
        layer_cls = type(peft.get_base_model().model.layers[0])
        self.model = FSDP(peft, auto_wrap_policy=ModuleWrapPolicy({layer_cls}), use_orig_params=True,
                          device_id=torch.device("cpu"))
        self.opt = adamw(list(trainable(peft).values()))

    def fix_grads(self):
        if self.grad_factor != 1.0:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.div_(self.grad_factor)

    def full_grads(self):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(self.model, with_grads=True, writeback=False):
            return {n: p.grad.detach().clone() for n, p in trainable(self.peft).items()}

    def full_params(self, only_trainable=True):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(self.model, writeback=False):
            return {n: p.detach().clone() for n, p in _named(self.peft, only_trainable).items()}


def ds_config(stage: int = 3) -> dict:
    return {
        "train_micro_batch_size_per_gpu": BATCH // dist.get_world_size(),
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0, "torch_adam": True}},
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class Zero3Run(Run):
    engine = "zero3"

    def __init__(self, peft):
        import deepspeed

        super().__init__(peft)
        self.model, self.opt, _, _ = deepspeed.initialize(model=peft, config=ds_config(),
                                                          model_parameters=list(trainable(peft).values()))

    def backward(self, loss):
        self.model.backward(loss)

    def fix_grads(self):
        if self.grad_factor != 1.0:
            raise NotImplementedError("ZeRO-3 gradients cannot be rescaled from the test")

    def step(self):
        self.model.step()

    def full_grads(self):
        from deepspeed.utils import safe_get_full_grad

        return {n: safe_get_full_grad(p).detach().clone() for n, p in trainable(self.peft).items()}

    def full_params(self, only_trainable=True):
        import deepspeed

        named = _named(self.peft, only_trainable)
        with deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=None):
            return {n: p.detach().clone() for n, p in named.items()}


ENGINES = {"ddp": DDPRun, "fsdp2": FSDP2Run, "fsdp1": FSDP1Run, "zero3": Zero3Run}


# ----------------------------------------------------------------------------------------------------
# the canary: a plain nn.Linear under the same engine
# ----------------------------------------------------------------------------------------------------
class _Canary(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.lin = nn.Linear(8, 4)

    def forward(self, x, **_):
        return self.lin(x).pow(2).mean()


def canary_factor(engine: str) -> float:
    """The engine's gradient divided by one process's on the whole batch (1.0 = averaging, world = summing)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.randn(BATCH, 8, generator=torch.Generator().manual_seed(6))
    ref = _Canary()
    ref(x).backward()
    want = ref.lin.weight.grad
    m = _Canary()
    xl = x[rank * (BATCH // world):(rank + 1) * (BATCH // world)]
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(m)  # kept alive until after backward: its reducer does the all-reduce
        ddp(xl).backward()
        got = m.lin.weight.grad
    elif engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(m, mesh=init_device_mesh("cpu", (world,)))
        m(xl).backward()
        got = m.lin.weight.grad.full_tensor()
    elif engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        f = FSDP(m, use_orig_params=True, device_id=torch.device("cpu"))
        f(xl).backward()
        with FSDP.summon_full_params(f, with_grads=True, writeback=False):
            got = m.lin.weight.grad.clone()
    elif engine == "zero3":
        import deepspeed
        from deepspeed.utils import safe_get_full_grad

        cfg = ds_config()
        eng, *_ = deepspeed.initialize(model=m, config=cfg, model_parameters=list(m.parameters()))
        eng.backward(eng(xl))
        got = safe_get_full_grad(m.lin.weight)
    else:
        raise ValueError(engine)
    return (got.norm() / want.norm()).item()


def factor_from_canary(engine: str) -> float:
    """1.0 or the world size (rounded from the canary ratio); anything else is an engine we do not understand."""
    ratio = canary_factor(engine)
    world = dist.get_world_size()
    for f in (1.0, float(world)):
        if abs(ratio - f) < 1e-4 * f:
            return f
    raise AssertionError(f"{engine} canary: gradient ratio {ratio} is neither 1 (mean) nor {world} (sum)")


# ----------------------------------------------------------------------------------------------------
# comparisons
# ----------------------------------------------------------------------------------------------------
def close(what: str, got, want, rtol: float, atol: float) -> float:
    """Assert got ~ want (tensors or floats); returns the max abs difference."""
    got_t, want_t = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    if got_t.shape != want_t.shape:
        raise AssertionError(f"{what}: shape {tuple(got_t.shape)} != {tuple(want_t.shape)}")
    diff = (got_t - want_t).abs()
    bad = diff > atol + rtol * want_t.abs()
    if bool(bad.any()):
        raise AssertionError(f"{what}: max abs diff {diff.max().item():.3g} (max ref {want_t.abs().max().item():.3g}, "
                             f"rtol {rtol}, atol {atol})")
    return diff.max().item() if diff.numel() else 0.0


def close_dicts(what: str, got: dict, want: dict, rtol: float, atol: float) -> float:
    if sorted(got) != sorted(want):
        raise AssertionError(f"{what}: keys differ: only got {sorted(set(got) - set(want))[:4]}, "
                             f"only want {sorted(set(want) - set(got))[:4]}")
    return max((close(f"{what} {k}", got[k], want[k], rtol, atol) for k in want), default=0.0)


def ranks_agree(what: str, tensors: dict) -> None:
    """Every rank holds bit-identical ``tensors`` (compared through an all_gather of the flat values)."""
    flat = torch.cat([t.detach().reshape(-1).double() for _, t in sorted(tensors.items())])
    out = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(out, flat)
    for r, o in enumerate(out):
        if not torch.equal(o, flat):
            raise AssertionError(f"{what}: rank {dist.get_rank()} and rank {r} differ by "
                                 f"{(o - flat).abs().max().item()}")


def global_loss(loss: torch.Tensor) -> float:
    t = loss.detach().float().clone()
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


# ----------------------------------------------------------------------------------------------------
# the training check and the save check
# ----------------------------------------------------------------------------------------------------
def train_and_compare(make_run, build_kw=None, autocast=None, cast=None, tol=FP32, grad_factor=1.0,
                      param_tol=None) -> dict:
    """Train STEPS steps under an engine and compare with one process (see the module docstring).

    ``param_tol`` (default ``tol``): for the parameters after STEPS AdamW steps. In 16-bit, a gradient
    entry near 0 can change sign with the summation order, and AdamW moves it by up to LR either way."""
    rank, world = dist.get_rank(), dist.get_world_size()
    build_kw = build_kw or {}
    ref = reference({k: v for k, v in build_kw.items() if k != "checkpointing"}, autocast=autocast, cast=cast)
    run = make_run(build(**build_kw))
    run.grad_factor = grad_factor
    base0 = {n: p for n, p in run.full_params(only_trainable=False).items() if n not in ref["params"]}
    info, params = train_steps(run, local_batch(rank, world), ref, tol=tol, autocast=autocast, param_tol=param_tol)
    ranks_agree("trained parameters", params)
    base1 = {n: p for n, p in run.full_params(only_trainable=False).items() if n not in ref["params"]}
    for n, p in base1.items():
        if not torch.equal(p, base0[n]):
            raise AssertionError(f"base weight {n} changed during training")
    ranks_agree("base weights", base1)
    return {"info": info, "run": run, "ref": ref}


def train_steps(run: Run, batch: dict, ref: dict, what: str = "", tol=FP32, autocast=None, param_tol=None):
    """STEPS steps of ``run`` on this rank's ``batch``, compared with the single-process ``ref``: the
    gradients after the first backward, the global loss of every step, the parameters at the end.
    Returns (info, the full trained parameters)."""
    what = f"{what} " if what else ""
    losses, info = [], {}
    for step in range(STEPS):
        loss = run.forward(batch, autocast=autocast)
        run.backward(loss)
        run.fix_grads()
        losses.append(global_loss(loss))
        if step == 0:
            info["grad_max_diff"] = close_dicts(f"{what}gradient after step 1", run.full_grads(), ref["grads0"], **tol)
        run.step()
    info["loss_max_diff"] = close(f"{what}loss per step", losses, ref["losses"], **tol)
    params = run.full_params()
    info["param_max_diff"] = close_dicts(f"{what}parameters after {STEPS} AdamW steps", params, ref["params"],
                                         **(param_tol or tol))
    info["losses"] = losses
    return info, params


def expect_error(fn, exc_types, *words) -> str:
    """Call ``fn()``: it must raise one of ``exc_types`` whose message holds every one of ``words``
    (a clear error, not any error). Returns the message."""
    try:
        fn()
    except exc_types as exc:
        msg = str(exc)
        missing = [w for w in words if w not in msg]
        if missing:
            raise AssertionError(f"unclear error (does not mention {missing}): {msg}")
        return msg
    raise AssertionError(f"expected {exc_types} mentioning {words}; nothing was raised")


def check_saved_adapter(run: Run, folder: str, ref_model=None, build_kw=None, state_dict_folder: str = None) -> dict:
    """After ``run.peft.save_pretrained(folder)`` on every rank: rank 0 wrote exactly what HF peft writes
    for the same (gathered) weights, other ranks wrote nothing, and the folder loads in fastpeft and in
    HF peft with equal logits (equal to the trained model's too)."""
    import peft
    from safetensors.torch import load_file

    import fastpeft

    rank = dist.get_rank()
    build_kw = build_kw or {}
    full = run.full_params()  # collective: before any rank-0-only work
    info = {}
    dist.barrier()
    if rank != 0:
        return info
    files = sorted(os.listdir(folder))
    if files != ["README.md", "adapter_config.json", "adapter_model.safetensors"]:
        raise AssertionError(f"{folder} holds {files}")
    ours = load_file(os.path.join(folder, "adapter_model.safetensors"))
    # what HF peft writes for the same weights
    kw = lora_kwargs(**{k: v for k, v in build_kw.items() if k not in ("checkpointing", "quantized")})
    theirs_model = peft.get_peft_model(tiny_model(KIND), peft.LoraConfig(**kw))
    sd = theirs_model.state_dict()
    for n, v in full.items():
        if n not in sd:
            raise AssertionError(f"HF peft's model has no parameter {n}")
        sd[n] = v
    theirs_model.load_state_dict(sd, strict=True)
    peft_dir = folder + "_peft"
    theirs_model.save_pretrained(peft_dir)
    theirs = load_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    if sorted(ours) != sorted(theirs):
        raise AssertionError(f"keys differ from HF peft's: ours only {sorted(set(ours) - set(theirs))[:4]}, "
                             f"peft only {sorted(set(theirs) - set(ours))[:4]}")
    for k in theirs:
        if ours[k].shape != theirs[k].shape or ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k]):
            raise AssertionError(f"{k}: ours {tuple(ours[k].shape)} {ours[k].dtype}, peft {tuple(theirs[k].shape)} "
                                 f"{theirs[k].dtype}, max diff {(ours[k].double() - theirs[k].double()).abs().max()}")
    info["keys"] = len(ours)
    cfg_ours = json.load(open(os.path.join(folder, "adapter_config.json")))
    cfg_theirs = json.load(open(os.path.join(peft_dir, "adapter_config.json")))
    for field in ("peft_type", "task_type", "r", "lora_alpha", "target_modules", "inference_mode", "bias"):
        a, b = cfg_ours.get(field), cfg_theirs.get(field)
        if (sorted(a) if isinstance(a, list) else a) != (sorted(b) if isinstance(b, list) else b):
            raise AssertionError(f"adapter_config.json {field}: ours {a!r}, peft {b!r}")
    if state_dict_folder is not None:
        again = load_file(os.path.join(state_dict_folder, "adapter_model.safetensors"))
        if sorted(again) != sorted(ours) or not all(torch.equal(again[k], ours[k]) for k in ours):
            raise AssertionError("save_pretrained(state_dict=...) wrote a different adapter")
    # loads back: fastpeft and HF peft, equal logits
    ids = full_batch()["input_ids"]
    fp = fastpeft.PeftModel.from_pretrained(tiny_model(KIND), folder).eval()
    hp = peft.PeftModel.from_pretrained(tiny_model(KIND), folder).eval()
    with torch.no_grad():
        a, b = fp(input_ids=ids).logits, hp(input_ids=ids).logits
    info["logits_fastpeft_vs_peft"] = close("logits, fastpeft vs HF peft loading the saved adapter", a, b,
                                            rtol=1e-5, atol=1e-5)
    if ref_model is not None:
        ref_model.eval()
        with torch.no_grad():
            c = ref_model(input_ids=ids).logits
        info["logits_vs_single_process"] = close("logits, loaded adapter vs single-process training", a, c,
                                                 rtol=1e-4, atol=1e-4)
    return info


def main_guard(fn):
    """Run ``fn()`` and exit with its code; an exception escaping it is printed with the rank."""
    try:
        code = fn()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(3)
    sys.exit(code)
