"""`fastpeft bench --fsdp2`: a LoRA training step under FSDP2, per rank: step time and peak memory,
fastpeft vs HF peft.

Each implementation gets its own ``torchrun --standalone --nproc_per_node N`` launch of this module
(so neither row inherits the other's memory): the bench decoder (fastpeft.bench.models), the same LoRA
weights in both (drawn by parameter name), ``fully_shard`` on every decoder layer and on the root,
then warm-up and timed steps of forward + causal-LM loss + backward + AdamW step on each rank's own
batch. Rank 0 gathers every rank's numbers.

Memory: on CUDA (one rank per GPU, nccl) ``torch.cuda.max_memory_allocated`` during the timed steps;
on CPU (gloo) the process's peak resident set size during the timed steps, sampled every millisecond,
and its rise above the RSS before them. RSS includes the allocator's cached pages and the libraries
loaded, so read the two rows against each other, not as absolute tensor bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

import torch

IMPLS_FSDP2 = ("fastpeft", "peft")


# ------------------------------------------------------------------------------------------- parent side
def run_fsdp2(case, device: torch.device, nproc: int = 2, repeats: int = 5, warmup: int = 1, seed: int = 0,
              timeout: float = 900.0) -> dict:
    """Launch the FSDP2 row for fastpeft and peft; returns the "fsdp2" entry of the bench JSON."""
    from .models import BenchSetupError, dtype_name

    if device.type == "cuda" and torch.cuda.device_count() < nproc:
        raise BenchSetupError(f"--fsdp2 with {nproc} ranks on CUDA needs {nproc} GPUs; "
                              f"{torch.cuda.device_count()} visible (use --fsdp2-nproc)")
    rows = {}
    for impl in IMPLS_FSDP2:
        with tempfile.TemporaryDirectory(prefix="fastpeft_fsdp2_") as tmp:
            out = os.path.join(tmp, "ranks.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   "-m", "fastpeft.bench.distributed", "--impl", impl, "--json", out, "--device", device.type,
                   "--repeats", str(repeats), "--warmup", str(warmup), "--seed", str(seed),
                   "--dtype", dtype_name(case.dtype), "--case", json.dumps(_case_fields(case))]
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
            proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=timeout)
            if proc.returncode != 0 or not os.path.isfile(out):
                raise BenchSetupError(f"the FSDP2 bench launch for {impl} failed (exit {proc.returncode}):\n"
                                      f"{proc.stdout[-3000:]}")
            with open(out) as fh:
                ranks = json.load(fh)
        rows[impl] = {"ranks": ranks,
                      "step_ms": max(r["step_ms"] for r in ranks),            # the slowest rank sets the pace
                      "peak_bytes": max(r["peak_bytes"] for r in ranks),
                      "peak_above_start_bytes": max(r["peak_above_start_bytes"] for r in ranks),
                      "first_loss": ranks[0]["first_loss"]}
    f, p = rows["fastpeft"], rows["peft"]
    ratio = (lambda a, b: a / b if b else None)
    return {"case": case.to_dict(), "label": f"FSDP2 x{nproc} {case.label()} (batch per rank)", "nproc": nproc,
            "memory": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS (sampled 1 ms)",
            "rows": rows,
            "ratios": {"step_ms": {"peft/fastpeft": ratio(p["step_ms"], f["step_ms"])},
                       "peak_bytes": {"peft/fastpeft": ratio(p["peak_bytes"], f["peak_bytes"])},
                       "peak_above_start_bytes": {"peft/fastpeft": ratio(p["peak_above_start_bytes"],
                                                                        f["peak_above_start_bytes"])}},
            "first_loss_rel_diff": abs(f["first_loss"] - p["first_loss"]) / max(abs(p["first_loss"]), 1e-30)}


def _case_fields(case) -> dict:
    return {k: getattr(case, k) for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "seq",
                                          "batch", "r", "dropout")}


def format_fsdp2(entry: dict) -> list:
    mib = (lambda b: f"{b / 2 ** 20:.1f}")
    note = "; dropout masks differ" if entry["case"].get("dropout") else ""
    lines = [f"{entry['label']}   (first-step loss rel. diff fastpeft vs peft {entry['first_loss_rel_diff']:.1e}"
             f"{note}; memory: {entry['memory']})",
             f"  {'impl':<9} {'step ms':>9} {'peak MiB':>9} {'peak-start MiB':>15}   per rank: step ms / peak MiB"]
    for impl in IMPLS_FSDP2:
        r = entry["rows"][impl]
        per = "  ".join(f"r{i} {x['step_ms']:.1f}/{mib(x['peak_bytes'])}" for i, x in enumerate(r["ranks"]))
        lines.append(f"  {impl:<9} {r['step_ms']:>9.2f} {mib(r['peak_bytes']):>9} "
                     f"{mib(r['peak_above_start_bytes']):>15}   {per}")
    rt = entry["ratios"]
    fmt = (lambda v: "-" if v is None else f"{v:.2f}x")
    lines.append(f"  peft/fastpeft: step {fmt(rt['step_ms']['peft/fastpeft'])}  "
                 f"peak {fmt(rt['peak_bytes']['peft/fastpeft'])}  "
                 f"peak-start {fmt(rt['peak_above_start_bytes']['peft/fastpeft'])}")
    return lines


# --------------------------------------------------------------------------------------------- rank side
class _PeakRSS:
    """Samples this process's resident set size every millisecond on a thread; .peak after stop()."""

    def __init__(self):
        import psutil

        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def worker_main(argv: Optional[list] = None) -> int:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .models import (DecoderCase, _lora_config_kwargs, _make_llama, draw_lora_weights, fastpeft_api, parse_dtype,
                         peft_api)

    ap = argparse.ArgumentParser(prog="fastpeft.bench.distributed")
    ap.add_argument("--impl", choices=IMPLS_FSDP2, required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--case", required=True)
    args = ap.parse_args(argv)

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    import transformers

    transformers.logging.set_verbosity_error()
    case = DecoderCase(dtype=parse_dtype(args.dtype), **json.loads(args.case))
    base = _make_llama(case, device, args.seed)
    get_peft_model, LoraConfig = fastpeft_api() if args.impl == "fastpeft" else peft_api()
    model = get_peft_model(base, LoraConfig(**_lora_config_kwargs(case.r, case.lora_alpha, case.dropout,
                                                                 list(case.targets), "CAUSAL_LM")))
    draw_lora_weights(model, args.seed + 1)
    mesh = init_device_mesh(device.type, (world,))
    for layer in model.get_base_model().model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(args.seed + 2 + rank)
    ids = torch.randint(0, case.vocab, (case.batch, case.seq), generator=g).to(device)
    model.train()

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    first_loss = step()
    for _ in range(max(0, args.warmup - 1)):
        step()
    dist.barrier()
    times = []
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    with (_PeakRSS() if not cuda else _Null()) as rss:
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        above = peak - start
    else:
        peak, above = rss.peak, rss.peak - rss.start
    mine = {"rank": rank, "step_ms": statistics.median(times), "step_ms_all": times, "peak_bytes": int(peak),
            "peak_above_start_bytes": int(above), "first_loss": first_loss,
            "local_params": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                for p in model.parameters())}
    every = [None] * world
    dist.all_gather_object(every, mine)
    if rank == 0:
        with open(args.json, "w") as fh:
            json.dump(every, fh)
    dist.barrier()
    dist.destroy_process_group()
    return 0


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(worker_main())
