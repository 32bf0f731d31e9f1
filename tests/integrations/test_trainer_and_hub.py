"""transformers' Trainer saves fastpeft models as adapters; push_to_hub uploads only the adapter;
prepare_model_for_kbit_training freezes, upcasts and turns on checkpointing."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft import LoraConfig, PeftModel, TaskType, get_peft_model
from _support.models import tiny_model


class _Ids(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=12, vocab=64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # gpt2 ties lm_head to wte: a state-dict save crashes
def test_trainer_checkpoints_and_save_model_write_the_adapter(tmp_path, kind):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_model(kind), LoraConfig(task_type=TaskType.CAUSAL_LM, r=4,
                                                              target_modules="all-linear", init_lora_weights=False))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, use_cpu=True,
                             save_strategy="steps", save_steps=2, report_to=[], logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=_Ids())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "checkpoint-2", tmp_path / "final"):
        files = set(os.listdir(folder))
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
        assert "model.safetensors" not in files, files
        keys = set(load_file(folder / "adapter_model.safetensors"))
        assert keys == set(fastpeft.get_peft_model_state_dict(model)), keys
    reloaded = PeftModel.from_pretrained(tiny_model(kind), str(tmp_path / "final"))
    ids = _Ids().ids[:2]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_push_to_hub_uploads_only_the_adapter(tmp_path, monkeypatch):
    import huggingface_hub

    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            uploaded["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploaded["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, commit_message, revision=None, create_pr=False):
            uploaded["files"] = sorted(os.listdir(folder_path))
            uploaded["tensors"] = sorted(load_file(os.path.join(folder_path, "adapter_model.safetensors")))
            return "commit-info"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = get_peft_model(tiny_model("llama"), LoraConfig(task_type=TaskType.CAUSAL_LM, r=4))
    assert model.push_to_hub("me/tiny-lora", token="t") == "commit-info"
    assert uploaded["repo"] == "me/tiny-lora" and uploaded["token"] == "t"
    assert uploaded["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert uploaded["tensors"] and all("lora_" in k for k in uploaded["tensors"])


def test_prepare_model_for_kbit_training_on_a_quantized_model():
    base = tiny_model("llama").to(torch.bfloat16)
    fastpeft.quantize(base, "nf4", blocksize=32, progressbar=False)
    out = fastpeft.prepare_model_for_kbit_training(base)
    assert out is base
    assert all(not p.requires_grad for p in base.parameters())
    assert all(p.dtype == torch.float32 for p in base.parameters())  # norms, embeddings, head upcast
    assert base.is_gradient_checkpointing
    model = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules="all-linear"))
    model.train()
    ids = _Ids().ids[:2]
    model(input_ids=ids, labels=ids).loss.backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n for n in trained)


@pytest.mark.parametrize("trainer_first", [True, False])
def test_trainer_recognises_fastpeft_models_whatever_the_import_order(trainer_first):
    # fastpeft patches transformers' trainer modules when they are already imported, or when they
    # get imported later (an import hook); a fresh interpreter checks each order.
    import subprocess
    import sys

    imports = ["import transformers.trainer", "import fastpeft"]
    code = "\n".join((imports if trainer_first else imports[::-1]) + [
        "import torch, transformers.trainer as tr, transformers.trainer_utils as tu",
        "m = fastpeft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), "
        "fastpeft.LoraConfig(target_modules=['0']))",
        "assert tu._is_peft_model(m)",
        "assert isinstance(m, (tr.PreTrainedModel, tr.PeftModel))",
        "assert not tu._is_peft_model(torch.nn.Linear(2, 2))",
        "print('ok')",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_patched_trainer_module_keeps_its_loader_services():
    # the import hook wraps transformers' trainer loader; inspect/linecache still reach its source
    import inspect

    import transformers.trainer as tr

    assert "def _save" in inspect.getsource(tr.Trainer._save)
    assert tr.__spec__.loader.get_source("transformers.trainer")
