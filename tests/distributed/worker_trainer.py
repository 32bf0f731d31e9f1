"""transformers' Trainer on a fastpeft model under torchrun (DDP over gloo, 2 CPU ranks).

    torchrun --standalone --nproc_per_node 2 tests/distributed/worker_trainer.py OUT_DIR

The Trainer is set up to do exactly what the single-process reference does: the same batch every step
(each rank its half, in order), constant learning rate, torch AdamW without weight decay, no clipping.
Checked: the logged loss of every step (Trainer rounds it to 4 digits), the trained LoRA parameters,
and the checkpoint Trainer writes, which must hold only the adapter and load in HF peft with the
trained logits.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


class _Rows(torch.utils.data.Dataset):
    """The whole batch once per step: STEPS * BATCH rows, in order."""

    def __init__(self):
        self.batch = C.full_batch()

    def __len__(self):
        return C.STEPS * C.BATCH

    def __getitem__(self, i):
        return {k: v[i % C.BATCH] for k, v in self.batch.items()}


def train_with_trainer(out: str) -> dict:
    from transformers import Trainer, TrainingArguments

    import peft

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    ref = C.reference()
    pm = C.build()
    args = TrainingArguments(output_dir=os.path.join(out, "trainer"), per_device_train_batch_size=C.BATCH // 2,
                             max_steps=C.STEPS, learning_rate=C.LR, lr_scheduler_type="constant", warmup_steps=0,
                             weight_decay=0.0, max_grad_norm=0.0, optim="adamw_torch", logging_steps=1,
                             save_steps=C.STEPS, save_strategy="steps", report_to=[], use_cpu=True,
                             ddp_backend="gloo", dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = InOrder(model=pm, args=args, train_dataset=_Rows())
    info = {"world_size": args.world_size, "distributed_type": str(trainer.accelerator.distributed_type)}
    if args.world_size != 2 or "MULTI_CPU" not in info["distributed_type"]:
        raise AssertionError(f"Trainer runs {info['distributed_type']} on {args.world_size} processes, not DDP on 2")
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    info["loss_max_diff"] = C.close("Trainer's logged loss per step", losses, ref["losses"], rtol=0, atol=1e-4)
    info["param_max_diff"] = C.close_dicts("parameters after Trainer's steps", C.trainable(pm), ref["params"], **C.FP32)
    dist.barrier()
    if dist.get_rank() == 0:
        folder = os.path.join(out, "trainer", f"checkpoint-{C.STEPS}")
        files = set(os.listdir(folder))
        if not {"adapter_config.json", "adapter_model.safetensors"} <= files or "model.safetensors" in files:
            raise AssertionError(f"Trainer's checkpoint is not an adapter: {sorted(files)}")
        ids = C.full_batch()["input_ids"]
        loaded = peft.PeftModel.from_pretrained(C.tiny_model(C.KIND), folder).eval()
        ref["model"].eval()
        with torch.no_grad():
            info["logits_peft_vs_single_process"] = C.close(
                "HF peft loading Trainer's checkpoint vs single-process training", loaded(input_ids=ids).logits,
                ref["model"](input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    return info


def main() -> int:
    out = sys.argv[1]
    C.init()
    results = C.Results(out)
    results.run("trainer.fp32", train_with_trainer, out)
    return results.finish()


if __name__ == "__main__":
    C.main_guard(main)
