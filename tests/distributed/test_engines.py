"""fastpeft under the existing distributed engines, 2 CPU ranks over gloo, launched as users launch them.

Each launch (torchrun --standalone --nproc_per_node 2, two torchrun "nodes", accelerate launch, and
transformers' Trainer under torchrun) runs a
worker script from this folder that batches many checks into one process group (each launch costs
~10 s of imports); the workers write one JSON result per rank and these tests assert on them, one
test per (engine, check). What each check compares is in worker.py's docstring; in short, against one
process training on the whole batch: the loss of every step, the full lora_A / lora_B gradients, the
parameters after 3 AdamW steps, fp32 tolerance; base weights unchanged, ranks agree; the adapter
rank 0 saves equals HF peft's file for the same weights and loads in fastpeft and in HF peft with
equal logits.

Engine bugs are kept out of the library's results by a canary (a plain nn.Linear under the same
engine, see _common.py): a gradient SUM (FSDP2 over gloo in some torch versions) is divided out in
the test only, and the factor seen is part of the results.

The default run is 6 launches plus the 2 of the `fastpeft bench --only fsdp2` row (about 70 s on 2 cores);
``--runslow`` adds one launch with the rest of the engine x feature matrix (about 30 s).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TIMEOUT = 420

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gloo launches over torchrun on Linux/macOS")

# launch name -> (command builder key, engines, checks (None: the worker's default set), [(engine, check)] expected)
FSDP2 = ["canary", "fp32", "bf16", "mp_bf16", "ckpt_reentrant", "ckpt_non_reentrant", "ckpt_wrapper",
         "dropout_replay", "dtensor", "load", "qlora", "qlora_sharded", "dora"]
DDP = ["canary", "fp32", "bf16", "ckpt_reentrant", "ckpt_non_reentrant", "dropout_replay"]
FSDP1 = ["canary", "fp32", "outer_shard", "load"]
ZERO3 = ["canary", "fp32", "load", "dora"]
LAUNCHES = {
    "fsdp2": ("torchrun", ["fsdp2"], None, [("fsdp2", c) for c in FSDP2]),
    "ddp_fsdp1": ("torchrun", ["ddp", "fsdp1"], None, [("ddp", c) for c in DDP] + [("fsdp1", c) for c in FSDP1]),
    "zero3": ("torchrun", ["zero3"], None, [("zero3", c) for c in ZERO3]),
    "two_node_ddp": ("two_nodes", ["ddp"], ["canary", "fp32"], [("ddp", "canary"), ("ddp", "fp32")]),
    "accelerate": ("accelerate", [], None, [("accelerate", "fp32")]),
    "trainer": ("trainer", [], None, [("trainer", "fp32")]),
}
# --runslow: the rest of the engine x feature matrix
SLOW = {
    "ddp": ["qlora", "qlora_sharded", "load", "dora"],
    "fsdp1": ["bf16", "ckpt_reentrant", "ckpt_non_reentrant", "dropout_replay", "qlora", "qlora_sharded", "dora"],
    "zero3": ["bf16", "ckpt_reentrant", "ckpt_non_reentrant", "dropout_replay", "qlora", "qlora_sharded"],
}
LAUNCHES["matrix_slow"] = ("torchrun", list(SLOW), ",".join(sorted({c for cs in SLOW.values() for c in cs})), None)
SLOW_CASES = [(e, c) for e, cs in SLOW.items() for c in cs]


def _env() -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", TRANSFORMERS_VERBOSITY="error",
               TOKENIZERS_PARALLELISM="false", ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _commands(kind: str, engines: list, checks, out: str) -> list:
    py = sys.executable
    worker = os.path.join(HERE, "worker.py")
    args = [out, ",".join(engines)] + ([checks if isinstance(checks, str) else ",".join(checks)] if checks else [])
    if kind == "torchrun":
        return [[py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker, *args]]
    if kind == "two_nodes":
        # two torchrun processes, one rank each, meeting at a c10d rendezvous: a two-"node" job on one machine
        port = _free_port()
        return [[py, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(i),
                 "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", f"fastpeft{port}",
                 worker, *args] for i in range(2)]
    if kind == "accelerate":
        # on CPU accelerate runs DDP over gloo (DistributedType.MULTI_CPU); ACCELERATE_USE_CPU is in _env()
        return [[py, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                 "1", "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(HERE, "worker_accelerate.py"),
                 out]]
    if kind == "trainer":
        return [[py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 os.path.join(HERE, "worker_trainer.py"), out]]
    raise ValueError(kind)


class Launch:
    def __init__(self, name: str, out: str):
        kind, engines, checks, _ = LAUNCHES[name]
        self.name = name
        start = time.time()
        procs = [subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True) for cmd in _commands(kind, engines, checks, out)]
        outputs, self.codes = [], []
        deadline = start + TIMEOUT
        for p in procs:
            try:
                text, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                for q in procs:  # the launcher and its workers: their own session
                    try:
                        os.killpg(q.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                text, _ = p.communicate()
                text += f"\n[test_engines] killed after {TIMEOUT} s"
            outputs.append(text)
            self.codes.append(p.returncode)
        self.seconds = time.time() - start
        self.output = "\n".join(outputs)
        self.ranks = {}
        for r in (0, 1):
            path = os.path.join(out, f"rank{r}.json")
            if os.path.isfile(path):
                with open(path) as fh:
                    self.ranks[r] = json.load(fh)

    def result(self, key: str) -> dict:
        tail = self.output[-6000:]
        got = {}
        for r in (0, 1):
            res = self.ranks.get(r, {}).get(key)
            assert res is not None, (f"{self.name}: rank {r} has no result for {key} (exit codes {self.codes})\n"
                                     f"--- launch output (tail) ---\n{tail}")
            if res["ok"] is False:
                pytest.fail(f"{self.name}: rank {r}: {key}: {res['error']}\n{res.get('traceback', '')}")
            got[r] = res
        return got


_LAUNCHED: dict = {}


@pytest.fixture(scope="session")
def launched(tmp_path_factory):
    def get(name: str) -> Launch:
        if name not in _LAUNCHED:
            _LAUNCHED[name] = Launch(name, str(tmp_path_factory.mktemp(name)))
        return _LAUNCHED[name]

    return get


CASES = [(name, engine, check) for name, (_, _, _, cases) in LAUNCHES.items() if cases for engine, check in cases]


@pytest.mark.parametrize("launch,engine,check", CASES, ids=[f"{n}-{e}-{c}" for n, e, c in CASES])
def test_engine_check(launched, launch, engine, check):
    got = launched(launch).result(f"{engine}.{check}")
    if check == "canary":
        # the engine's own reduction; anything but mean or sum already failed in the worker
        assert got[0]["info"]["grad_factor"] in (1.0, 2.0)


@pytest.mark.slow
@pytest.mark.parametrize("engine,check", SLOW_CASES, ids=[f"{e}-{c}" for e, c in SLOW_CASES])
def test_engine_matrix(launched, engine, check):
    launched("matrix_slow").result(f"{engine}.{check}")


def test_launches_exit_cleanly(launched):
    """Every default launch exited 0 (a worker that crashes after writing its results shows here)."""
    bad = {n: launched(n).codes for n, spec in LAUNCHES.items() if spec[3] and any(launched(n).codes)}
    assert not bad, f"launches with non-zero exit codes: {bad}"
    print("launch wall times:", {n: round(launched(n).seconds, 1) for n in LAUNCHES if n in _LAUNCHED})


def test_bench_fsdp2_row(tmp_path, capsys):
    """`fastpeft bench --only fsdp2`: per-rank step time and peak memory, fastpeft vs peft, 2 CPU ranks."""
    from fastpeft.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--device", "cpu", "--only", "fsdp2", "--repeats", "2", "--no-progress",
                 "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "FSDP2 x2" in table and "peft/fastpeft: step" in table
    data = json.loads(out.read_text())
    assert not data["layer"] and not data["decoder"]
    (entry,) = data["fsdp2"]
    assert entry["nproc"] == 2 and set(entry["rows"]) == {"fastpeft", "peft"}
    for impl, row in entry["rows"].items():
        assert [r["rank"] for r in row["ranks"]] == [0, 1], impl
        for r in row["ranks"]:
            assert r["step_ms"] > 0 and r["peak_bytes"] > 0 and r["local_params"] > 0, (impl, r)
        # the two ranks hold different halves of the sharded model, about equal in size
        sizes = [r["local_params"] for r in row["ranks"]]
        assert abs(sizes[0] - sizes[1]) <= 0.01 * max(sizes), sizes
    assert entry["rows"]["fastpeft"]["ranks"][0]["local_params"] == entry["rows"]["peft"]["ranks"][0]["local_params"]
    assert entry["ratios"]["step_ms"]["peft/fastpeft"] > 0
