"""The same training and save checks, launched by ``accelerate launch`` and prepared by an Accelerator.

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no tests/distributed/worker_accelerate.py OUT_DIR

On CPU accelerate runs this as DistributedType.MULTI_CPU (DDP over gloo): its FSDP and DeepSpeed
plugins are GPU-only (``--use_fsdp`` on a CPU machine gives DistributedType.NO, every process alone).
The adapter is saved the way accelerate's docs
show: ``accelerator.unwrap_model(model).save_pretrained(dir, is_main_process=..., state_dict=
accelerator.get_state_dict(model))`` on every rank, and plainly (``save_pretrained(dir)`` on every rank).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402
import torch.distributed as dist  # noqa: E402


class AccelerateRun(C.Run):
    def __init__(self, accelerator, model, opt, peft):
        super().__init__(peft)
        self.accelerator, self.model, self.opt = accelerator, model, opt
        self.engine = accelerator.distributed_type.value.lower()

    def backward(self, loss):
        self.accelerator.backward(loss)

    def full_grads(self):
        return {n: _full(p.grad) for n, p in C.trainable(self.peft).items()}

    def full_params(self, only_trainable=True):
        return {n: _full(p).detach().clone() for n, p in C._named(self.peft, only_trainable).items()}


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train_and_save(accelerator, out: str) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    ref = C.reference()
    peft = C.build()
    opt = C.adamw(list(C.trainable(peft).values()))
    model, opt = accelerator.prepare(peft, opt)
    peft = accelerator.unwrap_model(model)
    run = AccelerateRun(accelerator, model, opt, peft)
    info = {"distributed_type": str(accelerator.distributed_type),
            "sharded": type(next(iter(C.trainable(peft).values()))).__name__}
    info.update(C.train_steps(run, C.local_batch(rank, world), ref)[0])
    folder = os.path.join(out, "accelerate")
    sd_folder = folder + "_state_dict"
    peft.save_pretrained(folder)
    peft.save_pretrained(sd_folder, is_main_process=accelerator.is_main_process,
                         state_dict=accelerator.get_state_dict(model))
    accelerator.wait_for_everyone()
    info.update(C.check_saved_adapter(run, folder, ref_model=ref["model"], state_dict_folder=sd_folder))
    return info


def main() -> int:
    out = sys.argv[1]
    from accelerate import Accelerator

    accelerator = Accelerator()  # initializes the process group the way accelerate does
    results = C.Results(out)
    results.run("accelerate.fp32", train_and_save, accelerator, out)
    return results.finish()


if __name__ == "__main__":
    C.main_guard(main)
