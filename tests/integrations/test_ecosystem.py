"""transformers' Trainer, TRL (SFT, DPO; KTO, GRPO, reward) and accelerate take their LoRA path for
fastpeft models, with peft installed (this interpreter) and without it (a subprocess in which
``import peft`` fails). The README section "Train with TRL, Trainer, accelerate" runs as written.

The scenarios live in trl_helpers.py; here they run one by one. The table of names fastpeft patches
(fastpeft/integrations/ecosystem.py) is checked against the installed transformers / accelerate / TRL:
every name exists, every use of it in the module's source is one its replacement supports, without
peft no module reads a peft name the table leaves out, and every function of those libraries that
imports peft at run time was read (_VETTED_PEFT_IMPORTS). A missing name warns, naming library,
version, module and name.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import fastpeft
from fastpeft.integrations import ecosystem
from fastpeft.integrations.ecosystem import FastPeftIntegrationWarning

from . import trl_helpers as h

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(TESTS)


# -------------------------------------------------------------------------------------------------
# the patch table against the installed libraries
# -------------------------------------------------------------------------------------------------
def _targets():
    return sorted(ecosystem._TARGETS.items())


def _source(module_name: str) -> str:
    return importlib.util.find_spec(module_name).loader.get_source(module_name)


def test_installed_versions_are_the_ones_the_table_was_checked_against():
    from importlib.metadata import version

    for library, tested in ecosystem.TESTED_VERSIONS.items():
        # a different version must pass the structural tests below before TESTED_VERSIONS is bumped
        assert version(library) == tested, (f"{library} {version(library)} is installed, fastpeft's table was checked "
                                            f"against {tested}: run tests/integrations and update TESTED_VERSIONS")


def test_every_patched_name_exists_and_was_patched():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPeftIntegrationWarning)
        for module_name, _ in _targets():
            importlib.import_module(module_name)
    status = ecosystem.report()
    for module_name, names in _targets():
        module = sys.modules[module_name]
        for name, role in names.items():
            expected = ("kept original",) if role == ecosystem.ORIGINAL else ("patched", "kept")
            assert status[module_name][name] in expected, (module_name, name, status[module_name])
            value = getattr(module, name)
            if role == ecosystem.ORIGINAL:
                assert not getattr(value, "_fastpeft_patch", False), (module_name, name)
                assert value is sys.modules["accelerate.utils"].is_peft_model.__wrapped__
            elif role in (ecosystem.PEFT_ONLY, ecosystem.BUILD):
                assert value.__module__.split(".")[0] == "peft", (module_name, name)  # peft installed: left alone
            else:
                assert getattr(value, "_fastpeft_patch", False), (module_name, name, value)


def _uses(tree: ast.AST, name: str):
    """(kind, line) for each read of ``name``: "call", "isinstance" (2nd argument, alone or in a tuple), "tuple"
    (in another tuple of classes), "other"."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Load)):
            continue
        parent = parents.get(node)
        holder = parents.get(parent) if isinstance(parent, ast.Tuple) else parent
        arg = parent if isinstance(parent, ast.Tuple) else node
        if isinstance(parent, ast.Call) and parent.func is node:
            yield "call", node.lineno
        elif (isinstance(holder, ast.Call) and getattr(holder.func, "id", None) in ("isinstance", "issubclass")
              and len(holder.args) == 2 and holder.args[1] is arg):
            yield "isinstance", node.lineno
        elif isinstance(parent, ast.Tuple):  # e.g. Trainer._save: supported = (PreTrainedModel, PeftModel)
            yield "tuple", node.lineno
        else:
            yield "other", node.lineno


_SUPPORTED_USE = {
    ecosystem.PREDICATE: {"call"}, ecosystem.PREDICATE_UNWRAPPING: {"call"}, ecosystem.AVAILABLE: {"call"},
    ecosystem.DISPATCH: {"call"}, ecosystem.BUILD: {"call"}, ecosystem.ORIGINAL: {"call"},
    ecosystem.PEFT_HELPER: {"call"},
    ecosystem.ACCEPT: {"isinstance", "tuple"}, ecosystem.PEFT_ONLY: {"isinstance"},
}


@pytest.mark.parametrize("module_name,names", _targets(), ids=[m for m, _ in _targets()])
def test_every_use_of_a_patched_name_is_one_its_replacement_supports(module_name, names):
    source = _source(module_name)
    tree = ast.parse(source)
    bound = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
             for a in node.names}
    bound |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    for name, role in names.items():
        assert name in bound, f"{module_name} no longer imports or defines {name}"
        bad = [(kind, line) for kind, line in _uses(tree, name) if kind not in _SUPPORTED_USE[role]]
        assert not bad, f"{module_name}: {name} ({role}) is used in ways the patch does not cover: {bad}"


@pytest.mark.parametrize("module_name,names", _targets(), ids=[m for m, _ in _targets()])
def test_without_peft_no_module_reads_a_peft_name_the_table_leaves_out(module_name, names):
    source = _source(module_name)
    if ecosystem.AVAILABLE in names.values():  # elsewhere the module's own is_peft_available() still guards peft
        reads = ecosystem.peft_names_read(source, names)
        assert set(reads) <= set(names), {n: lines for n, lines in reads.items() if n not in names}
    # peft's API is only imported at module level (fastpeft fills those names in); a function-level
    # `from peft import ...` would run, and fail, once is_peft_available() says True
    tree = ast.parse(source)
    for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        for node in ast.walk(func):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "peft":
                assert ecosystem.AVAILABLE not in names.values(), (module_name, func.name, node.lineno)


# Functions of these libraries that import peft when they run. Each was read: it is either not reached for a
# fastpeft model, or the table keeps fastpeft models away from it. A new one must be read and added here.
_VETTED_PEFT_IMPORTS = {
    # transformers' own adapter API on PreTrainedModel (PeftAdapterMixin): peft's, not used for fastpeft models
    **{("transformers.integrations.peft", f): "peft's adapter API" for f in (
        "load_adapter", "add_adapter", "set_adapter", "disable_adapters", "enable_adapters", "active_adapters",
        "get_adapter_state_dict", "delete_adapter")},
    ("transformers.distributed.fsdp", "update_fsdp_plugin_peft"): "peft_helper in transformers.trainer",
    ("accelerate.utils.fsdp_utils", "_get_model_state_dict"): "fsdp_utils keeps accelerate's is_peft_model",
    ("accelerate.utils.fsdp_utils", "_set_model_state_dict"): "fsdp_utils keeps accelerate's is_peft_model",
    ("accelerate.utils.modeling", "is_peft_model"): "the original predicate, behind is_peft_available()",
}


def _imports_peft(node) -> bool:
    if isinstance(node, ast.ImportFrom):
        return not node.level and (node.module or "").split(".")[0] == "peft"
    return isinstance(node, ast.Import) and any(a.name.split(".")[0] == "peft" for a in node.names)


def test_functions_that_import_peft_at_run_time_are_all_vetted():
    skip = (os.path.join("transformers", "models"), os.path.join("trl", "experimental"))
    found = set()
    for lib in ("transformers", "accelerate", "trl"):
        root = os.path.dirname(importlib.util.find_spec(lib).origin)
        for folder, dirs, files in os.walk(root):
            rel = os.path.relpath(folder, os.path.dirname(root))
            if rel.startswith(skip):
                dirs[:] = []
                continue
            for file in (f for f in files if f.endswith(".py")):
                text = open(os.path.join(folder, file), encoding="utf-8").read()
                if "peft" not in text:
                    continue
                module = os.path.join(rel, file[:-3]).replace(os.sep, ".").removesuffix(".__init__")
                for func in ast.walk(ast.parse(text)):
                    if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                            any(_imports_peft(n) for n in ast.walk(func)):
                        found.add((module, func.name))
    assert found <= set(_VETTED_PEFT_IMPORTS), sorted(found - set(_VETTED_PEFT_IMPORTS))


def test_fsdp_helpers_treat_fastpeft_models_as_before():
    import peft
    from accelerate.utils import fsdp_utils

    h.fsdp_helpers_treat_fastpeft_as_before()
    # why: peft's adapter state dict does not know fastpeft's layers
    model = h.get_peft_model(h.tiny_model("llama"), h.lora_config())
    assert peft.get_peft_model_state_dict(model) == {}
    assert fsdp_utils.is_peft_model is not sys.modules["accelerate.utils"].is_peft_model


def test_fastpeft_classes_the_stand_ins_name_exist():
    for peft_name in ecosystem._FASTPEFT_CLASSES:
        cls = ecosystem._fastpeft_class(peft_name, load=True)
        assert isinstance(cls, type) and cls.__name__ in (peft_name, "PeftModel"), peft_name


def test_peft_models_and_configs_are_still_recognised():
    import peft
    import transformers.trainer as tr
    import trl.trainer.sft_trainer as sft
    from accelerate.utils import is_peft_model

    model = peft.get_peft_model(h.tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert is_peft_model(model) and tr._is_peft_model(model) and sft.is_peft_model(model)
    assert isinstance(model, tr.PeftModel) and isinstance(peft.LoraConfig(), sft.PeftConfig)
    assert type(sft.get_peft_model(h.tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"])))\
        .__module__.startswith("peft.")
    # the stand-in is peft's class for everything but isinstance
    assert sft.PeftConfig.from_pretrained.__func__ is peft.PeftConfig.from_pretrained.__func__
    assert issubclass(peft.LoraConfig, sft.PeftConfig) and issubclass(fastpeft.LoraConfig, sft.PeftConfig)
    assert not isinstance(fastpeft.LoraConfig(), sft.PrefixTuningConfig)  # peft-only workaround: not for fastpeft
    hints = __import__("typing").get_type_hints(sft.SFTTrainer.__init__, sft.__dict__)
    assert hints["peft_config"] == (sft.PeftConfig | None)


# -------------------------------------------------------------------------------------------------
# a library that changed: clear warnings, no silent failure
# -------------------------------------------------------------------------------------------------
def test_a_missing_patch_target_warns_naming_library_version_module_and_name(monkeypatch):
    import types
    from importlib.metadata import version

    monkeypatch.setattr(ecosystem, "_STATUS", {})
    fake = types.ModuleType("trl.trainer.sft_trainer")  # as if TRL renamed is_peft_model
    fake.is_peft_available = lambda: True
    with pytest.warns(FastPeftIntegrationWarning) as record:
        ecosystem._patch(fake)
    text = " ".join(str(w.message) for w in record)
    assert f"trl {version('trl')}" in text and "`trl.trainer.sft_trainer.is_peft_model` does not exist" in text
    assert "tested with trl 1.16.0" in text
    assert ecosystem.report()["trl.trainer.sft_trainer"]["is_peft_model"] == "missing"


def test_without_peft_a_peft_name_outside_the_table_warns(monkeypatch, tmp_path):
    # as if a new TRL read peft's PeftType: without peft it would raise NameError at that line
    path = tmp_path / "fake_trainer.py"
    path.write_text(textwrap.dedent("""
        from accelerate.utils import is_peft_model
        from transformers.utils import is_peft_available
        if False:
            from peft import PeftConfig, PeftType, get_peft_model
        def make(model, config):
            if isinstance(config, PeftConfig) and config.peft_type == PeftType.LORA:
                return get_peft_model(model, config)
    """))
    spec = importlib.util.spec_from_file_location("trl.trainer.sft_trainer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(ecosystem, "_STATUS", {})
    monkeypatch.setattr(ecosystem, "_peft_loaded", lambda: False)
    with pytest.warns(FastPeftIntegrationWarning, match=r"uses peft's PeftType, which fastpeft does not provide"):
        ecosystem._patch(module)
    assert ecosystem.report()["trl.trainer.sft_trainer"]["PeftConfig"] == "filled in"
    assert ecosystem.peft_names_read(path.read_text(), {})["PeftType"] == [7]


def test_a_patch_that_fails_does_not_break_the_import(monkeypatch):
    import types

    def boom(module):
        raise RuntimeError("boom")

    monkeypatch.setattr(ecosystem, "_patch", boom)
    with pytest.warns(FastPeftIntegrationWarning, match=r"patching trl.trainer.sft_trainer failed \(RuntimeError"):
        ecosystem._patch_safely(types.ModuleType("trl.trainer.sft_trainer"))


# -------------------------------------------------------------------------------------------------
# the trainers, with peft installed
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["model", "peft_config"])
def test_sft_trainer_trains_a_fastpeft_model_and_peft_loads_the_checkpoint(tmp_path, mode):
    h.sft(str(tmp_path), mode)


def test_sft_trainer_trains_dora_with_dropout_and_peft_loads_it(tmp_path):
    trainer = h.sft(str(tmp_path), "peft_config", use_dora=True, lora_dropout=0.1)
    assert any("lora_magnitude_vector" in n for n, p in trainer.model.named_parameters() if p.requires_grad)


def test_sft_trainer_refuses_lora_on_lm_head_like_for_peft(tmp_path):
    h.sft_refuses_lora_on_lm_head(str(tmp_path))


def test_sft_trainer_refuses_a_fastpeft_model_with_a_peft_config(tmp_path):
    import datasets
    from trl import SFTConfig, SFTTrainer

    model = h.get_peft_model(h.tiny_model("llama"), h.lora_config())
    with pytest.raises(ValueError, match="You passed a `PeftModel` instance together with a `peft_config`"):
        SFTTrainer(model=model, peft_config=h.lora_config(), args=SFTConfig(output_dir=str(tmp_path), **h.COMMON),
                   train_dataset=datasets.Dataset.from_dict(h.sft_rows()), processing_class=h.word_tokenizer())


def test_sft_trainer_with_an_unimplemented_lora_option_names_it(tmp_path):
    import datasets
    from trl import SFTConfig, SFTTrainer

    with pytest.raises(NotImplementedError, match="kasa_config"):
        SFTTrainer(model=h.tiny_model("llama"), peft_config=h.lora_config(kasa_config={"beta": 0.1}),
                   args=SFTConfig(output_dir=str(tmp_path), **h.COMMON),
                   train_dataset=datasets.Dataset.from_dict(h.sft_rows()), processing_class=h.word_tokenizer())


@pytest.mark.parametrize("mode", ["peft_config", "model"])
def test_dpo_trainer_uses_the_model_without_a_second_copy_as_reference(tmp_path, mode):
    h.dpo(str(tmp_path), mode)


@pytest.mark.parametrize("kind", ["kto", "grpo", "reward"])
def test_other_trl_trainers_take_their_lora_path(tmp_path, kind):
    h.other_trl_trainer(str(tmp_path), kind)


def test_trainer_with_reentrant_checkpointing_trains_every_layer_and_resumes(tmp_path):
    h.trainer_with_checkpointing(str(tmp_path))


def test_accelerate_prepare_unwrap_and_is_peft_model():
    h.accelerate_prepare()


# -------------------------------------------------------------------------------------------------
# without peft
# -------------------------------------------------------------------------------------------------
def test_everything_above_works_without_peft_installed():
    # peft blocked before anything imports it (importlib.util.find_spec("peft") is then None, so transformers,
    # accelerate and TRL see it as not installed); TRL, transformers and accelerate imported before fastpeft, so
    # this also covers patching modules that were loaded first; a FastPeftIntegrationWarning is an error
    code = textwrap.dedent(f"""
        import sys, warnings
        sys.modules["peft"] = None
        sys.path[:0] = [{TESTS!r}]
        warnings.filterwarnings("error", message="fastpeft cannot")
        import accelerate.utils, transformers.trainer, trl.trainer.dpo_trainer, trl.trainer.sft_trainer
        from trl import ModelConfig, get_peft_config
        import fastpeft
        config = get_peft_config(ModelConfig(use_peft=True, lora_r=4, lora_target_modules=["q_proj"]))
        assert type(config) is fastpeft.LoraConfig and config.r == 4, config
        import runpy
        runpy.run_module("integrations.trl_helpers", run_name="__main__")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["trl.trainer.sft_trainer"]["PeftConfig"] == "filled in"
    assert report["transformers.trainer"]["PeftModel"] == "filled in"
    assert "missing" not in {v for names in report.values() for v in names.values()}


# -------------------------------------------------------------------------------------------------
# the README section
# -------------------------------------------------------------------------------------------------
SECTION = "## Train with TRL, Trainer, accelerate"


def _readme_code() -> str:
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    match = re.search(r"```python\n(.*?)```", text.split(SECTION, 1)[1], re.S)
    assert match, f"README.md: no python block under {SECTION!r}"
    return match.group(1)


def test_readme_section_runs(tmp_path, monkeypatch):
    """The README code, unchanged but for short CPU runs, on a tiny local base model and json datasets."""
    import datasets

    code = _readme_code()
    code, hits = re.subn(r'\b(SFTConfig|DPOConfig)\(output_dir="([^"]+)"\)', r'\1(output_dir="\2", **_SHORT_RUN)', code)
    assert hits == 3, hits
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "path" / "to" / "base"
    h.tiny_model("llama").save_pretrained(str(base))
    tokenizer = h.word_tokenizer()
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    tokenizer.save_pretrained(str(base))
    datasets.Dataset.from_dict(h.sft_rows()).to_json(str(tmp_path / "sft.jsonl"))
    datasets.Dataset.from_dict(h.dpo_rows()).to_json(str(tmp_path / "dpo.jsonl"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    namespace = {"_SHORT_RUN": dict(h.COMMON, max_steps=2, save_steps=2)}
    exec(compile(code, "README.md", "exec"), namespace)
    for folder in ("sft-out/checkpoint-2", "sft-out-2/checkpoint-2", "dpo-out/checkpoint-2", "sft-adapter",
                   "dpo-adapter", "sft-adapter-more"):
        h.assert_adapter_only_checkpoint(tmp_path / folder)
    import peft

    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    trained = namespace["accelerator"].unwrap_model(namespace["model"])
    torch.testing.assert_close(h.logits(peft.PeftModel.from_pretrained(h.tiny_model("llama"), "sft-adapter-more"), ids),
                               h.logits(trained, ids))
