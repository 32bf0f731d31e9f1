"""Checks under the engines: DDP, FSDP2 (fully_shard), FSDP1 (use_orig_params=True), DeepSpeed ZeRO-3.

    torchrun --standalone --nproc_per_node 2 tests/distributed/worker.py OUT_DIR ENGINE[,ENGINE..] [CHECK,..]
    (zero3: with DS_ACCELERATOR=cpu in the environment)

Each check's result goes to OUT_DIR/rank<r>.json under "<engine>.<check>" (see _common.Results);
test_engines.py launches this and asserts on the results. Checks (default: the CI set for the engine):

  canary        the engine's gradient reduction on a plain nn.Linear (mean or sum; scales the others)
  fp32          train 3 steps = one process on the whole batch; save_pretrained (+ state_dict=) = HF peft's file
  bf16          the same under torch.autocast(bf16), bf16 tolerances
  mp_bf16       FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) against a bf16 model
  ckpt_reentrant / ckpt_non_reentrant
                activation checkpointing (transformers' gradient_checkpointing_enable) = one process
  ckpt_wrapper  torch's apply_activation_checkpointing (CheckpointWrapper around each block) = one process,
                and the adapter saves like peft's through the wrapper's names
  dropout_replay  lora_dropout with checkpointing: the recompute draws the forward's seeds on every rank
                (each rank seeded differently) and the gradients equal the non-checkpointed run's
  dtensor       fully_shard on lora_A / lora_B alone: a clear error naming lora_A; on base_layer alone: gathered
  load          load a saved adapter into the wrapped model (FSDP2 DTensors, ZeRO-3 partitions): equal logits;
                FSDP1: the clear refusal
  dora          DoRA adapters (use_dora=True: the magnitude trains too) = one process; the adapter saves like
                peft's (its lora_magnitude_vector keys) and loads in fastpeft and HF peft with equal logits
  qlora         nf4 QuantLinear base (QLoRA) under the engine = one process; the adapter saves like peft's
  qlora_sharded the same with the packed codes as parameters (fastpeft.quant.packed_as_parameters): FSDP2 and
                ZeRO-3 shard them (checked), FSDP1 refuses (uniform dtype) and that is what is checked
  outer_shard   FSDP1: a LoRA target owned by the root FSDP unit: save_pretrained on the inner model raises a
                clear error; passing the FSDP root / a FULL_STATE_DICT writes the right file
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402  (sets sys.path, imports torch)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

DEFAULT = {
    "ddp": ["canary", "fp32", "bf16", "ckpt_reentrant", "ckpt_non_reentrant", "dropout_replay"],
    "fsdp2": ["canary", "fp32", "bf16", "mp_bf16", "ckpt_reentrant", "ckpt_non_reentrant", "ckpt_wrapper",
              "dropout_replay", "dtensor", "load", "qlora", "qlora_sharded", "dora"],
    "fsdp1": ["canary", "fp32", "outer_shard", "load"],
    "zero3": ["canary", "fp32", "load", "dora"],
}
FACTOR: dict = {}


def make(engine, **kw):
    return lambda peft: C.ENGINES[engine](peft, **kw)


def check_canary(engine):
    FACTOR[engine] = 1.0  # if the canary fails, the other checks run unscaled (and are reported as they come)
    FACTOR[engine] = C.factor_from_canary(engine)
    return {"grad_factor": FACTOR[engine]}


def _engine_state_dict(run):
    """The full state dict the engine's own API gives (what Trainer / accelerate pass as state_dict=)."""
    if run.engine == "ddp":
        return run.model.state_dict()  # keys with DDP's "module." prefix
    if run.engine == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(run.peft, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if run.engine == "fsdp1":
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(run.model, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(rank0_only=True)):
            return run.model.state_dict()
    if run.engine == "zero3":
        return run.model._zero3_consolidated_16bit_state_dict()  # rank 0; None elsewhere
    raise ValueError(run.engine)


def _assert_sharded(run):
    """The adapter parameters really are in the engine's sharded form when save_pretrained runs."""
    p = next(iter(C.trainable(run.peft).values()))
    state = {"fsdp2": type(p).__name__ == "DTensor", "zero3": p.numel() == 0 and hasattr(p, "ds_numel"),
             "fsdp1": getattr(p, "_fsdp_flattened", False) and p.dim() == 1, "ddp": True}[run.engine]
    if not state:
        raise AssertionError(f"{run.engine}: adapter parameter is {type(p).__name__} {tuple(p.shape)}, not sharded")


def save_and_check(run, ref, tag, build_kw=None):
    _assert_sharded(run)
    folder = os.path.join(OUT, f"{run.engine}_{tag}")
    run.peft.save_pretrained(folder)  # every rank; rank 0 writes
    sd_folder = folder + "_state_dict"
    run.peft.save_pretrained(sd_folder, state_dict=_engine_state_dict(run))
    # only rank 0 writes (every rank still gathers): each rank names its own folder
    mine = f"{folder}_by_rank{dist.get_rank()}"
    run.peft.save_pretrained(mine)
    dist.barrier()
    if os.path.isdir(mine) != (dist.get_rank() == 0):
        raise AssertionError(f"rank {dist.get_rank()}: save_pretrained wrote {mine}: {os.path.isdir(mine)}")
    return C.check_saved_adapter(run, folder, ref_model=ref["model"], build_kw=build_kw, state_dict_folder=sd_folder)


def check_fp32(engine):
    got = C.train_and_compare(make(engine), grad_factor=FACTOR.get(engine, 1.0))
    got["info"].update(save_and_check(got["run"], got["ref"], "fp32"))
    if engine == "fsdp1":  # the FSDP1 root itself is accepted too
        import fastpeft

        sd = fastpeft.get_peft_model_state_dict(got["run"].model)
        ours = fastpeft.get_peft_model_state_dict(got["run"].peft)
        for k in ours:
            C.close(f"get_peft_model_state_dict(FSDP root) {k}", sd[k], ours[k], 0, 0)
    return got["info"]


def check_dora(engine):
    build_kw = {"use_dora": True}
    got = C.train_and_compare(make(engine), build_kw=build_kw, grad_factor=FACTOR.get(engine, 1.0))
    if not any("lora_magnitude_vector" in n for n in got["ref"]["params"]):
        raise AssertionError("no DoRA magnitude among the trained parameters")
    got["info"].update(save_and_check(got["run"], got["ref"], "dora", build_kw=build_kw))
    return got["info"]


def check_bf16(engine):
    return C.train_and_compare(make(engine), autocast=torch.bfloat16, tol=C.BF16, param_tol=C.BF16_PARAMS,
                               grad_factor=FACTOR.get(engine, 1.0))["info"]


def check_mp_bf16(engine):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return C.train_and_compare(make(engine, mp=mp), cast=torch.bfloat16, tol=C.BF16, param_tol=C.BF16_PARAMS,
                               grad_factor=FACTOR.get(engine, 1.0))["info"]


def check_ckpt(engine, mode):
    got = C.train_and_compare(make(engine), build_kw={"checkpointing": mode}, grad_factor=FACTOR.get(engine, 1.0))
    if mode == "wrapper":  # module names now hold "_checkpoint_wrapped_module.": the saved file must not
        if not any("_checkpoint_wrapped_module" in n for n, _ in got["run"].peft.named_modules()):
            raise AssertionError("apply_activation_checkpointing wrapped no block")
        got["info"].update(save_and_check(got["run"], got["ref"], "ckpt_wrapper"))
    return got["info"]


def check_dropout_replay(engine):
    """lora_dropout 0.25 with checkpointing (both modes) vs without: the same seeds and gradients, per rank."""
    from fastpeft.ops import lora_op

    rank, world = dist.get_rank(), dist.get_world_size()
    batch = C.local_batch(rank, world)
    drawn: list = []
    original = lora_op.draw_seed

    def recording():
        s = original()
        drawn.append(int(s))
        return s

    def grads(mode):
        run = C.ENGINES[engine](C.build(checkpointing=mode, lora_dropout=0.25))
        run.grad_factor = FACTOR.get(engine, 1.0)
        drawn.clear()
        torch.manual_seed(1000 + rank)  # each rank its own masks
        loss = run.forward(batch)
        n_fwd = len(drawn)
        run.backward(loss)
        run.fix_grads()
        return run.full_grads(), list(drawn[:n_fwd]), list(drawn[n_fwd:])

    info = {}
    lora_op.draw_seed = recording
    try:
        plain, fwd_seeds, bwd_seeds = grads(None)
        if bwd_seeds or not fwd_seeds:
            raise AssertionError(f"without checkpointing: {len(fwd_seeds)} seeds in forward, "
                                 f"{len(bwd_seeds)} in backward")
        # the ranks drew different seeds (so a rank replaying another's mask would show)
        mine = torch.tensor(fwd_seeds, dtype=torch.float64)
        allr = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(allr, mine)
        if any(torch.equal(allr[r], mine) for r in range(world) if r != rank):
            raise AssertionError("two ranks drew the same dropout seeds")
        no_dropout = C.ENGINES[engine](C.build())
        no_dropout.grad_factor = FACTOR.get(engine, 1.0)
        no_dropout.backward(no_dropout.forward(batch))
        no_dropout.fix_grads()
        nd = no_dropout.full_grads()
        if all(torch.allclose(nd[k], plain[k]) for k in nd):
            raise AssertionError("dropout 0.25 left every gradient unchanged: no masks applied")
        for mode in ("reentrant", "non_reentrant"):
            g, fwd2, recomputed = grads(mode)
            if fwd2 != fwd_seeds:
                raise AssertionError(f"{mode}: forward seeds differ from the plain run's")
            if sorted(recomputed) != sorted(fwd_seeds):
                raise AssertionError(f"{mode}: the recompute drew seeds {recomputed}, the forward {fwd_seeds}")
            info[f"{mode}_grad_max_diff"] = C.close_dicts(f"{mode} checkpointed gradients vs plain", g, plain,
                                                          rtol=1e-6, atol=1e-7)
        info["seeds_per_forward"] = len(fwd_seeds)
    finally:
        lora_op.draw_seed = original
    return info


def check_dtensor(engine):
    """fully_shard on lora_A / lora_B alone -> ValueError naming lora_A; on base_layer alone -> gathered, correct."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    batch = C.local_batch(rank, world)
    # 1. the adapters' own modules sharded: the LoRA layer reads their weights without calling them
    pm = C.build()
    for name, mod in pm.named_modules():
        if name.endswith(("lora_A.default", "lora_B.default")):
            fully_shard(mod, mesh=mesh)
    fully_shard(pm, mesh=mesh)
    msg = C.expect_error(lambda: pm(**batch).loss.backward(), ValueError, "lora_A", "DTensor", "fully_shard")
    # 2. only the frozen base layers sharded on their own: gathered in the op, the result is right
    ref = C.reference(steps=1)
    pm = C.build()
    for name, mod in pm.named_modules():
        if name.endswith("base_layer"):
            fully_shard(mod, mesh=mesh)
    for layer in pm.get_base_model().model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(pm, mesh=mesh)
    loss = pm(**batch).loss
    loss.backward()
    factor = FACTOR.get(engine, 1.0)
    grads = {n: p.grad.full_tensor() / factor for n, p in C.trainable(pm).items()}
    return {"message": msg[:160], "loss_diff": C.close("loss", C.global_loss(loss), ref["losses"][0], **C.FP32),
            "grad_diff": C.close_dicts("gradients, base layers sharded alone", grads, ref["grads0"], **C.FP32)}


def check_load(engine):
    """An adapter saved by one process, loaded into the wrapped model: equal logits and parameters."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ref = C.reference(steps=2)
    folder = os.path.join(OUT, f"{engine}_load_src")
    if rank == 0:
        ref["model"].save_pretrained(folder)
    dist.barrier()
    run = C.ENGINES[engine](C.build(init_lora_weights=True))  # B = 0: differs from the saved adapter until loaded
    try:
        res = run.peft.load_adapter(folder, adapter_name="default", is_trainable=True)
    except NotImplementedError as exc:
        if engine == "fsdp1" and "FSDP1" in str(exc) and "before" in str(exc):
            return {"refused": str(exc)[:160]}
        raise
    if engine == "fsdp1":
        raise AssertionError("load_adapter into an FSDP1-wrapped model did not refuse")
    if res.missing_keys or res.unexpected_keys:
        raise AssertionError(f"load_adapter: {res}")
    batch = C.local_batch(rank, world)
    run.model.eval()
    ref["model"].eval()
    with torch.no_grad():
        got = run.model(input_ids=batch["input_ids"]).logits
        want = ref["model"](input_ids=batch["input_ids"]).logits
    info = {"logits_diff": C.close(f"logits after load_adapter into {engine}", got, want, rtol=1e-5, atol=1e-5)}
    info["param_diff"] = C.close_dicts("loaded parameters", run.full_params(), ref["params"], 0, 0)
    return info


def check_qlora(engine, sharded=False):
    """nf4 QuantLinear bases (QLoRA): training under the engine = one process; the adapter saves like peft's.

    sharded: the packed codes made parameters first (fastpeft.quant.packed_as_parameters), so the engine
    shards them; without it they are buffers, whole on every rank."""
    from fastpeft.quant import packed_as_parameters

    build_kw = {"quantized": True, "model_kw": dict(hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                                    num_key_value_heads=1)}
    ref = C.reference(build_kw)
    pm = C.build(**build_kw)
    info = {}
    if sharded:
        info["layers_converted"] = packed_as_parameters(pm)
    try:
        run = C.ENGINES[engine](pm)
    except (ValueError, RuntimeError, AssertionError) as exc:
        if engine == "fsdp1" and sharded and "uniform" in str(exc):
            return {"refused_by_fsdp1": str(exc)[:200]}
        raise
    if engine == "fsdp1" and sharded:
        raise AssertionError("FSDP1 flattened uint8 codes with float adapters")
    run.grad_factor = FACTOR.get(engine, 1.0)
    # where the packed codes of the first layer live, on this rank
    name, codes = next((n, t) for n, t in list(pm.named_parameters()) + list(pm.named_buffers())
                       if n.endswith("q_proj.base_layer.weight"))
    full_numel = getattr(codes, "ds_numel", None) or codes.numel()
    local = codes.to_local() if hasattr(codes, "to_local") else codes
    info["codes_local_numel"], info["codes_full_numel"] = local.numel(), full_numel
    if sharded and engine in ("fsdp2", "zero3") and not local.numel() < full_numel:
        raise AssertionError(f"{engine}: packed codes not sharded ({local.numel()} of {full_numel} on this rank)")
    rank, world = dist.get_rank(), dist.get_world_size()
    info.update(C.train_steps(run, C.local_batch(rank, world), ref, "QLoRA")[0])
    folder = os.path.join(OUT, f"{engine}_qlora{'_sharded' if sharded else ''}")
    run.peft.save_pretrained(folder)
    dist.barrier()
    if rank == 0:
        from safetensors.torch import load_file

        saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
        want = {k.replace(".default", ""): v for k, v in ref["params"].items()}
        info["saved_diff"] = C.close_dicts("saved QLoRA adapter", saved, want, **C.FP32)
    return info


def check_outer_shard(engine):
    """FSDP1 root owning a LoRA target (lm_head): the inner model's save_pretrained cannot see it whole."""
    import fastpeft

    rank, world = dist.get_rank(), dist.get_world_size()
    kw = {"target_modules": TARGETS_WITH_HEAD}
    run = C.ENGINES[engine](C.build(**kw))
    run.backward(run.forward(C.local_batch(rank, world)))
    msg = C.expect_error(lambda: run.peft.save_pretrained(os.path.join(OUT, "outer_bad")), RuntimeError, "FSDP1",
                         "state_dict=", "lm_head")
    folder = os.path.join(OUT, "outer_ok")
    run.peft.save_pretrained(folder, state_dict=_engine_state_dict(run))
    via_root = fastpeft.get_peft_model_state_dict(run.model)  # the FSDP root: every rank
    dist.barrier()
    full = run.full_params(only_trainable=False)
    info = {"message": msg[:160]}
    if rank == 0:
        from safetensors.torch import load_file

        saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
        # the LoRA tensors, plus lm_head's weight (peft saves a targeted embedding layer in full)
        want = {k.replace(".default", ""): v for k, v in full.items()
                if ".lora_" in k or k == "base_model.model.lm_head.base_layer.weight"}
        info["saved_diff"] = C.close_dicts("adapter saved from the FSDP1 root's state dict", saved, want, 0, 0)
        C.close_dicts("get_peft_model_state_dict(FSDP root)", via_root, want, 0, 0)
    return info


TARGETS_WITH_HEAD = C.TARGETS + ["lm_head"]
CHECKS = {
    "canary": check_canary, "fp32": check_fp32, "bf16": check_bf16, "mp_bf16": check_mp_bf16,
    "ckpt_reentrant": lambda e: check_ckpt(e, "reentrant"),
    "ckpt_non_reentrant": lambda e: check_ckpt(e, "non_reentrant"),
    "ckpt_wrapper": lambda e: check_ckpt(e, "wrapper"),
    "dropout_replay": check_dropout_replay, "dtensor": check_dtensor, "load": check_load, "qlora": check_qlora,
    "qlora_sharded": lambda e: check_qlora(e, sharded=True),
    "outer_shard": check_outer_shard, "dora": check_dora,
}


def main() -> int:
    global OUT
    OUT = sys.argv[1]
    engines = sys.argv[2].split(",")
    only = sys.argv[3].split(",") if len(sys.argv) > 3 and sys.argv[3] else None
    C.init()
    results = C.Results(OUT)
    for engine in engines:
        for check in only or DEFAULT[engine]:
            if check != "canary" and engine not in FACTOR:
                results.run(f"{engine}.canary", check_canary, engine)
            if check == "canary" and engine in FACTOR:
                continue
            results.run(f"{engine}.{check}", CHECKS[check], engine)
    return results.finish()


OUT = ""
if __name__ == "__main__":
    C.main_guard(main)
