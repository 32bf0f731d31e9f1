"""Training scenarios shared by test_ecosystem.py (in this interpreter, with peft installed) and by its
subprocess in which ``import peft`` fails (``python -m integrations.trl_helpers`` with peft blocked runs
them all). Each scenario asserts what it checks and returns what the caller may check further.

Everything is tiny and local: the 2-layer Llama of _support.models, a word-level tokenizer built here,
datasets from dicts; 2-3 optimizer steps at a high learning rate so the adapter visibly moves.
"""
from __future__ import annotations

import contextlib
import os

import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft import LoraConfig, TaskType, get_peft_model
from _support.models import tiny_model

# ids match the tiny Llama's config: pad 0, bos 1, eos 2
WORDS = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]
COMMON = dict(use_cpu=True, bf16=False, report_to=[], logging_steps=1, per_device_train_batch_size=4,
              learning_rate=5e-2, save_strategy="steps", disable_tqdm=True)


def word_tokenizer():
    """A PreTrainedTokenizerFast over WORDS (whitespace-split words, no merges)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _sentence(i: int, n: int) -> str:
    return " ".join(f"w{(i * 7 + j * 3) % 61}" for j in range(n))


def sft_rows(n: int = 8) -> dict:
    return {"text": [_sentence(i, 10) for i in range(n)]}


def dpo_rows(n: int = 8) -> dict:
    return {"prompt": [_sentence(i, 5) for i in range(n)], "chosen": [" w1 w2 w3"] * n,
            "rejected": [" w9 w8 w7"] * n}


def lora_config(**overrides) -> LoraConfig:
    return LoraConfig(**{"task_type": TaskType.CAUSAL_LM, "r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                         **overrides})


def lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def assert_adapter_only_checkpoint(folder, heads: tuple = ()) -> set:
    """The folder holds an adapter (LoRA tensors, and the fully trained ``heads``), not the model."""
    files = set(os.listdir(folder))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
    assert not any(f.startswith(("model.", "pytorch_model")) for f in files), files
    keys = set(load_file(os.path.join(folder, "adapter_model.safetensors")))
    assert keys and all("lora_" in k or any(f".{head}." in k for head in heads) for k in keys), keys
    return files


def assert_every_layer_trained(before: dict, model) -> None:
    """Every LoRA matrix in every decoder layer moved (with reentrant checkpointing a block only backpropagates
    when its input requires grad: enable_input_require_grads)."""
    after = lora_state(model)
    assert after.keys() == before.keys() and after
    unchanged = [n for n in after if torch.equal(after[n], before[n])]
    assert not unchanged, unchanged
    for layer in range(model.get_base_model().config.num_hidden_layers):
        assert any(f"layers.{layer}." in n for n in after), layer


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def reload_logits(folder, ids):
    """The saved adapter loaded on a fresh base: with HF peft when installed, else with fastpeft."""
    try:
        import peft
    except ImportError:
        peft = fastpeft
    return logits(peft.PeftModel.from_pretrained(tiny_model("llama"), str(folder)), ids)


@contextlib.contextmanager
def count_disable_adapter():
    """Counts PeftModel.disable_adapter() calls (fastpeft's) inside the block: a list, one item per call."""
    cls = fastpeft.PeftModel
    original = cls.__dict__["disable_adapter"]
    calls = []

    def spy(self):
        calls.append(type(self).__name__)
        return original(self)

    cls.disable_adapter = spy
    try:
        yield calls
    finally:
        cls.disable_adapter = original


# -------------------------------------------------------------------------------------------------
# scenarios
# -------------------------------------------------------------------------------------------------
def sft(out_dir: str, mode: str, **lora_kw):
    """SFTTrainer on a fastpeft model (mode "model") or on a plain model with a fastpeft peft_config
    (LoraConfig fields overridden by ``lora_kw``)."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=out_dir, max_steps=3, save_steps=3, gradient_checkpointing=True,
                     gradient_checkpointing_kwargs={"use_reentrant": True}, **COMMON)
    if mode == "model":
        model, extra = get_peft_model(tiny_model("llama"), lora_config(**lora_kw)), {}
    else:
        model, extra = tiny_model("llama"), {"peft_config": lora_config(**lora_kw)}
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(sft_rows()),
                         processing_class=word_tokenizer(), **extra)
    peft_model = trainer.model
    assert isinstance(peft_model, fastpeft.PeftModelForCausalLM), type(peft_model)
    if mode == "model":
        assert peft_model is model
    base = peft_model.get_base_model()
    # TRL's LoRA path: the fused LM head goes on the base model (get_base_model), input grads are on
    assert "forward" in vars(base) and "forward" not in vars(peft_model)
    assert base.get_input_embeddings()._forward_hooks, "enable_input_require_grads was not called"
    before = lora_state(peft_model)
    trainer.train()
    assert_every_layer_trained(before, peft_model)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    ckpt = os.path.join(out_dir, "checkpoint-3")
    assert_adapter_only_checkpoint(ckpt)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(reload_logits(ckpt, ids), logits(peft_model, ids))
    return trainer


def sft_refuses_lora_on_lm_head(out_dir: str) -> str:
    """TRL's own check (isinstance(lm_head, BaseTunerLayer)) sees fastpeft's LoRA layers."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    model = get_peft_model(tiny_model("llama"), lora_config(target_modules=["q_proj", "lm_head"]))
    try:
        SFTTrainer(model=model, args=SFTConfig(output_dir=out_dir, max_steps=1, **COMMON),
                   train_dataset=datasets.Dataset.from_dict(sft_rows()), processing_class=word_tokenizer())
    except ValueError as exc:
        assert "Applying a PEFT adapter to `lm_head` is not supported" in str(exc), exc
        return str(exc)
    raise AssertionError("SFTTrainer accepted LoRA on lm_head")


def dpo(out_dir: str, mode: str):
    """DPOTrainer without a reference model. peft_config: the reference is the model with its adapters
    disabled. A fastpeft model: TRL adds a frozen copy of the adapter, "ref", and uses it as reference."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=out_dir, max_steps=2, save_steps=2, **COMMON)
    if mode == "model":
        model, extra = get_peft_model(tiny_model("llama"), lora_config()), {}
    else:
        model, extra = tiny_model("llama"), {"peft_config": lora_config()}
    with count_disable_adapter() as calls:
        trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(dpo_rows()),
                             processing_class=word_tokenizer(), **extra)
        assert trainer.ref_model is None  # no second model
        peft_model = trainer.model
        assert isinstance(peft_model, fastpeft.PeftModelForCausalLM), type(peft_model)
        before = lora_state(peft_model)
        trainer.train()
    after = lora_state(peft_model)
    default = [n for n in after if ".default." in n]
    assert default and all(not torch.equal(after[n], before[n]) for n in default)
    if mode == "model":
        assert list(peft_model.peft_config) == ["default", "ref"]
        ref = [n for n in after if ".ref." in n]
        assert ref and all(torch.equal(after[n], before[n]) for n in ref)  # the reference stays put
        assert all(torch.equal(before[n.replace(".ref.", ".default.")], before[n]) for n in ref)
        assert not calls
    else:
        assert list(peft_model.peft_config) == ["default"]
        assert len(calls) >= args.max_steps, calls  # the reference forward of each step
    rewards = [e for e in trainer.state.log_history if "rewards/margins" in e]
    assert rewards and rewards[-1]["rewards/margins"] != 0.0  # policy and reference differ after a step
    assert_adapter_only_checkpoint(os.path.join(out_dir, "checkpoint-2"))
    return trainer


def other_trl_trainer(out_dir: str, kind: str):
    """KTO, GRPO (reference through disabled adapters, like DPO) and the reward trainer (a SEQ_CLS adapter
    with its score head), each given a fastpeft peft_config: 2 steps, adapter-only checkpoint."""
    import datasets
    import trl

    prompts = [_sentence(i, 5) for i in range(8)]
    config, heads, model = lora_config(), (), tiny_model("llama")
    if kind == "kto":
        rows = {"prompt": prompts, "completion": [" w1 w2 w3", " w9 w8 w7"] * 4, "label": [True, False] * 4}
        extra = {}
    elif kind == "grpo":
        rows = {"prompt": prompts}
        extra = {"reward_funcs": lambda completions, **_: [float(len(c)) for c in completions]}
    else:  # reward
        rows = {"chosen": [_sentence(i, 6) for i in range(8)], "rejected": [_sentence(i + 3, 6) for i in range(8)]}
        config, heads, model, extra = lora_config(task_type=TaskType.SEQ_CLS), ("score",), \
            tiny_model("llama_seqcls", num_labels=1), {}
    options = {"grpo": dict(num_generations=2, max_completion_length=4, beta=0.1)}.get(kind, {})
    names = {"kto": ("KTOConfig", "KTOTrainer"), "grpo": ("GRPOConfig", "GRPOTrainer"),
             "reward": ("RewardConfig", "RewardTrainer")}[kind]
    args = getattr(trl, names[0])(output_dir=out_dir, max_steps=2, save_steps=2, **COMMON, **options)
    with count_disable_adapter() as calls:
        trainer = getattr(trl, names[1])(model=model, peft_config=config, args=args,
                                         train_dataset=datasets.Dataset.from_dict(rows),
                                         processing_class=word_tokenizer(), **extra)
        assert isinstance(trainer.model, fastpeft.PeftModel), type(trainer.model)
        before = lora_state(trainer.model)
        trainer.train()
    if kind != "reward":
        assert trainer.ref_model is None and len(calls) >= 2, (trainer.ref_model, calls)
    assert any(not torch.equal(before[n], v) for n, v in lora_state(trainer.model).items())
    assert_adapter_only_checkpoint(os.path.join(out_dir, "checkpoint-2"), heads)
    return trainer


def trainer_with_checkpointing(out_dir: str):
    """transformers' Trainer: reentrant activation checkpointing trains every layer; checkpoints hold the
    adapter; resuming loads it back (load_adapter)."""
    from transformers import Trainer, TrainingArguments
    import datasets

    ids = torch.randint(3, 64, (8, 12), generator=torch.Generator().manual_seed(0))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    common = {k: v for k, v in COMMON.items() if k != "bf16"}
    args = TrainingArguments(output_dir=out_dir, max_steps=2, save_steps=2, gradient_checkpointing=True,
                             gradient_checkpointing_kwargs={"use_reentrant": True}, **common)
    model = get_peft_model(tiny_model("llama"), lora_config())
    before = lora_state(model)
    Trainer(model=model, args=args, train_dataset=data).train()
    assert_every_layer_trained(before, model)
    ckpt = os.path.join(out_dir, "checkpoint-2")
    assert_adapter_only_checkpoint(ckpt)
    # resume a fresh model (other adapter init) from the checkpoint: nothing left to train, weights = checkpoint
    fresh = get_peft_model(tiny_model("llama"), lora_config(init_lora_weights=False))
    resumed = Trainer(model=fresh, args=args, train_dataset=data)
    resumed.train(resume_from_checkpoint=ckpt)
    saved = lora_state(model)
    for name, value in lora_state(fresh).items():
        torch.testing.assert_close(value, saved[name])
    return model


def accelerate_prepare():
    """Accelerator.prepare / unwrap_model / is_peft_model, and one optimizer step through accelerate."""
    from accelerate import Accelerator
    from accelerate.utils import is_peft_model

    model = get_peft_model(tiny_model("llama"), lora_config())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    accelerator = Accelerator(cpu=True)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    assert is_peft_model(prepared) and is_peft_model(model)
    assert is_peft_model(torch.nn.DataParallel(model))  # a wrapper accelerate unwraps
    assert accelerator.unwrap_model(prepared) is model
    assert not is_peft_model(tiny_model("llama")) and not is_peft_model(torch.nn.Linear(2, 2))
    before = lora_state(model)
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    accelerator.backward(prepared(input_ids=ids, labels=ids).loss)
    optimizer.step()
    assert any(not torch.equal(before[n], v) for n, v in lora_state(model).items())
    return accelerator


def fsdp_helpers_treat_fastpeft_as_before():
    """FSDP helpers that call peft's own functions for a peft model keep fastpeft models off that path:
    accelerate's adapter-only FSDP state dict (peft's get_peft_model_state_dict would give an empty dict)
    and transformers' update_fsdp_plugin_peft (imports peft)."""
    import transformers.trainer
    from accelerate.utils import fsdp_utils

    model = get_peft_model(tiny_model("llama"), lora_config())
    state = fsdp_utils._get_model_state_dict(model, adapter_only=True)
    assert state.keys() == model.state_dict().keys()  # the full state dict, as for any non-peft model
    assert transformers.trainer.update_fsdp_plugin_peft(model, None) is None


def run_all(out_dir: str) -> None:
    sft(os.path.join(out_dir, "sft-model"), "model")
    sft(os.path.join(out_dir, "sft-config"), "peft_config")
    sft_refuses_lora_on_lm_head(os.path.join(out_dir, "sft-lm-head"))
    dpo(os.path.join(out_dir, "dpo-config"), "peft_config")
    dpo(os.path.join(out_dir, "dpo-model"), "model")
    for kind in ("kto", "grpo", "reward"):
        other_trl_trainer(os.path.join(out_dir, kind), kind)
    trainer_with_checkpointing(os.path.join(out_dir, "trainer"))
    accelerate_prepare()
    fsdp_helpers_treat_fastpeft_as_before()


if __name__ == "__main__":  # the subprocess of test_ecosystem.py (peft blocked)
    import importlib.util
    import json
    import sys
    import tempfile
    import warnings

    from transformers.utils import is_peft_available

    from fastpeft.integrations.ecosystem import FastPeftIntegrationWarning, report

    warnings.simplefilter("error", FastPeftIntegrationWarning)
    assert importlib.util.find_spec("peft") is None and not is_peft_available()
    try:
        import peft  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("peft is importable")
    with tempfile.TemporaryDirectory() as tmp:
        run_all(tmp)
    assert "peft" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
    print(json.dumps(report()))
