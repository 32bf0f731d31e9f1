"""PeftModel and its task subclasses: the object users hold after get_peft_model / from_pretrained.

A PeftModel wraps a tuner (``base_model``, a LoraModel) which wraps the user's model
(``base_model.model``); state_dict keys therefore start with ``base_model.model.`` exactly as in
peft. Prompt-learning adapters follow peft's other layout: ``base_model`` is the user's model and
the virtual tokens come from ``prompt_encoder`` (fastpeft.tuners.prompt.model.PromptLearningMixin).
This class owns what is not per-layer: adapter bookkeeping across the whole model, the task
heads that train in full, parameter counting, and saving/loading adapter folders in peft's format
(see fastpeft.utils.save_and_load for the key rules).

Loading validates everything it can before the model is touched (config file, weights file),
and shape errors found afterwards roll the model back, so a failed load does not leave a
half-adapted model behind. Saving stages all files in a temporary folder next to the target and
moves them into place only once every file was written.
"""
from __future__ import annotations

import copy
import inspect
import os
from contextlib import contextmanager
from typing import Any, Optional, Union

from torch import nn

from fastpeft.integrations.hub import PushToHubMixin
from fastpeft.config import PeftConfig
from fastpeft.tuners.mixed_batch import adapter_names_context
from fastpeft.tuners.lora.variants import alora as _alora  # aLoRA offsets hook
from fastpeft.tuners.prompt.model import PromptLearningMixin
from fastpeft.utils.atomic import staged_folder
from fastpeft.utils.model_card import model_card_text_for
from fastpeft.utils.peft_types import PeftType, TaskType
from fastpeft.utils.save_and_load import (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, find_weights_file,
                                          is_lora_layer, is_modules_to_save_wrapper,
                                          load_weights_file, set_peft_model_state_dict, validate_adapter_name,
                                          write_weights)

__all__ = [
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftModelForQuestionAnswering",
    "PeftModelForFeatureExtraction",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "get_layer_status",
    "get_model_status",
    "TunerLayerStatus",
    "TunerModelStatus",
]

from fastpeft.tuners.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status  # noqa: E402


def __getattr__(name: str):
    # peft exposes its type tables here too; they live in fastpeft.mapping, which imports this module
    if name in ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING"):
        from fastpeft import mapping

        return getattr(mapping, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _tuner_class(peft_type) -> type:
    """The tuner (model-wrapping) class for an adapter method; imported lazily to keep imports light."""
    key = getattr(peft_type, "value", peft_type)
    if key == PeftType.LORA.value:
        from fastpeft.tuners.lora.model import LoraModel

        return LoraModel
    raise NotImplementedError(
        f"fastpeft has no model implementation for peft_type {key!r} yet (implemented: LORA); "
        f"use Hugging Face peft for this adapter."
    )


def _check_config(peft_config) -> None:
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a fastpeft PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}")
    if peft_config.is_adaption_prompt:
        raise NotImplementedError(
            f"{type(peft_config).__name__}: adaption prompt is not supported by fastpeft's PeftModel yet."
        )
    if peft_config.is_prompt_learning:
        if getattr(peft_config.peft_type, "value", peft_config.peft_type) not in (
                PeftType.PROMPT_TUNING.value, PeftType.P_TUNING.value, PeftType.PREFIX_TUNING.value):
            raise NotImplementedError(f"fastpeft does not implement the prompt-learning method "
                                      f"{peft_config.peft_type!r} yet")
        return
    _tuner_class(peft_config.peft_type)


def _refuse_trainable_prompt(config, is_trainable: bool) -> None:
    # peft 0.21 refuses this too: a saved p-tuning / prefix-projection adapter holds the prompt
    # network's output, not the network, so there is nothing to continue training from.
    if is_trainable and config.is_prompt_learning:
        raise ValueError(
            f"is_trainable=True is not possible for a prompt-learning adapter ({config.peft_type}): the saved file "
            f"holds only the final prompt, as in peft. Load it for inference, or train a new adapter."
        )


def _hub_kwargs(kwargs: dict) -> dict:
    """The subset of kwargs that huggingface_hub.hf_hub_download understands (token, cache_dir, ...)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover
        return {}
    names = set(inspect.signature(hf_hub_download).parameters) - {"repo_id", "filename", "subfolder"}
    return {k: v for k, v in kwargs.items() if k in names}


def _model_name_or_path(model: nn.Module) -> Optional[str]:
    """Where the base model came from (transformers records it when loading), or None."""
    name = getattr(model, "name_or_path", None)
    if not name:
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return name or None


def _submodule_parent(root: nn.Module, name: str):
    parent_name, _, attr = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), attr


def _strip_tuner(model: nn.Module) -> None:
    """Put the original modules back in place of LoRA layers and modules_to_save wrappers (no merge)."""
    # deepest names first, so a parent is replaced after its children
    # (trainable-tokens wrappers are marked by a class attribute: this module does not import the tuners)
    def wrapper(m):
        return is_modules_to_save_wrapper(m) or getattr(type(m), "_is_trainable_tokens_wrapper", False)

    names = [n for n, m in model.named_modules() if n and (is_lora_layer(m) or wrapper(m))]
    for name in sorted(names, key=lambda n: n.count("."), reverse=True):
        parent, attr = _submodule_parent(model, name)
        mod = getattr(parent, attr)
        setattr(parent, attr, mod.original_module if wrapper(mod) else mod.get_base_layer())
    if "peft_config" in model.__dict__:
        del model.__dict__["peft_config"]


class PeftModel(PromptLearningMixin, PushToHubMixin, nn.Module):
    """A model with adapters. ``base_model`` is the tuner; ``get_base_model()`` the user's model.

    With a prompt-learning adapter (prompt tuning, p-tuning, prefix tuning) ``base_model`` is the
    user's model itself and the prompts live in ``prompt_encoder`` (see tuners/prompt/model.py).
    """

    # task heads that peft trains in full for this task (added to config.modules_to_save)
    _auto_modules_to_save: tuple = ()

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> None:
        # low_cpu_mem_usage: LoRA weights are created on the meta device, uninitialised, for a load to fill
        # (peft's option; fastpeft/utils/meta_init.py)
        super().__init__()
        validate_adapter_name(adapter_name)
        _check_config(peft_config)
        self.modules_to_save: Optional[set] = None
        self.peft_type = peft_config.peft_type
        # forward kwargs that steer the adapters instead of going to the model
        self.special_peft_forward_args = {"adapter_names", "alora_offsets"}
        self._is_prompt_learning = bool(peft_config.is_prompt_learning)
        self._fill_config_from_model(peft_config, model)
        self._add_task_heads(peft_config)
        if self._is_prompt_learning:
            # virtual tokens: the user's model is base_model itself (peft's layout)
            self._init_prompt_learning(model, peft_config, adapter_name)
            self._prepare_for_checkpointing(model)
            return
        self.base_model = _tuner_class(peft_config.peft_type)(model, {adapter_name: peft_config}, adapter_name,
                                                              low_cpu_mem_usage=low_cpu_mem_usage)
        self._update_modules_to_save(peft_config)
        self._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        config = getattr(model, "config", None)
        if getattr(config, "pretraining_tp", 1) not in (None, 1):
            # llama's tensor-parallel emulation reads .weight slices directly, bypassing LoRA layers
            config.pretraining_tp = 1
        self._prepare_for_checkpointing(model)

    # ---------------------------------------------------------------------------------------------
    # attribute access
    # ---------------------------------------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":  # before __init__ assigned it: do not recurse
                raise
            return getattr(self.base_model, name)

    @property
    def peft_config(self) -> dict:
        if self.__dict__.get("_is_prompt_learning"):
            return self._prompt_configs
        return self.base_model.peft_config

    @peft_config.setter
    def peft_config(self, value: dict) -> None:
        if self.__dict__.get("_is_prompt_learning"):
            self._prompt_configs = value
            return
        self.base_model.peft_config = value

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        if self.__dict__.get("_is_prompt_learning"):
            return self._prompt_active
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        if self.__dict__.get("_is_prompt_learning"):
            return [self._prompt_active]
        return self.base_model.active_adapters

    @property
    def active_peft_config(self) -> PeftConfig:
        active = self.active_adapter
        return self.peft_config[active if isinstance(active, str) else active[0]]

    def get_base_model(self) -> nn.Module:
        """The user's model (with LoRA layers inside)."""
        if self.__dict__.get("_is_prompt_learning"):
            return self.base_model
        return self.base_model.model

    # ---------------------------------------------------------------------------------------------
    # construction helpers
    # ---------------------------------------------------------------------------------------------
    @staticmethod
    def _fill_config_from_model(peft_config: PeftConfig, model: nn.Module) -> None:
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = _model_name_or_path(model)

    def _add_task_heads(self, peft_config: PeftConfig) -> None:
        """Add this task's output heads to modules_to_save (before injection, so they get wrapped)."""
        if not self._auto_modules_to_save:
            return
        current = list(peft_config.modules_to_save or [])
        peft_config.modules_to_save = current + [n for n in self._auto_modules_to_save if n not in current]

    def _update_modules_to_save(self, peft_config: PeftConfig) -> None:
        names = getattr(peft_config, "modules_to_save", None)
        if names:
            self.modules_to_save = set(self.modules_to_save or ()) | set(names)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool) -> None:
        cast = getattr(self.base_model, "_cast_adapter_dtype", None)
        if cast is not None:
            cast(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

    @staticmethod
    def _prepare_for_checkpointing(model: nn.Module) -> None:
        # With (reentrant) activation checkpointing the checkpointed blocks only backpropagate when
        # their input requires grad; the embeddings are frozen now, so make their output require it.
        flag = getattr(model, "is_activation_checkpointing", None)
        if flag is None:
            flag = model.__dict__.get("is_gradient_checkpointing", False)
        quantized = any(getattr(model, a, False) for a in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized"))
        if flag is True and not quantized and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()

    # ---------------------------------------------------------------------------------------------
    # parameters
    # ---------------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), counting 4-bit packed weights by their logical size."""
        trainable = total = 0
        for _, param in self.named_parameters():
            n = param.numel()
            if n == 0 and hasattr(param, "ds_numel"):  # DeepSpeed ZeRO-3 keeps only a placeholder
                n = param.ds_numel
            if type(param).__name__ == "Params4bit":
                # two 4-bit values per byte of storage
                if hasattr(param, "element_size"):
                    n *= 2 * param.element_size()
                else:
                    n *= 2 * getattr(getattr(param, "quant_storage", None), "itemsize", 1)
            total += n
            if param.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        pct = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")

    def get_layer_status(self) -> list:
        """One TunerLayerStatus per adapter layer (fastpeft/tuners/status.py)."""
        return get_layer_status(self)

    def get_model_status(self):
        """The adapter state of the whole model as a TunerModelStatus (fastpeft/tuners/status.py)."""
        return get_model_status(self)

    # ---------------------------------------------------------------------------------------------
    # forward
    # ---------------------------------------------------------------------------------------------
    def _model_kwargs(self, kwargs: dict) -> dict:
        return {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}

    def _adapter_names(self, args: tuple, kwargs: dict):
        """The context a call runs in: adapter_names=[...] (one adapter per sample, "__base__" for none)
        checked as peft checks it and made the current mixed batch (tuners/mixed_batch.py)."""
        if kwargs.get("adapter_names") is not None and self._is_prompt_learning:
            raise ValueError("adapter_names=[...] applies to LoRA adapters, not to prompt-learning adapters")
        # aLoRA: offsets from input_ids (causal LMs, as peft) or alora_offsets=[...]; read before adapter_names goes
        alora = _alora.call_context(self, args, kwargs, compute=self._prompt_task == "CAUSAL_LM")
        return _alora.joined(alora, adapter_names_context(self, args, kwargs, self.peft_config))

    # the TaskType value a task class stands for (prompt learning handles labels/inputs per task)
    _prompt_task: Optional[str] = None

    def forward(self, *args: Any, **kwargs: Any):
        if self._is_prompt_learning:
            if args:
                if len(args) > 1 or "input_ids" in kwargs:
                    raise TypeError("With a prompt-learning adapter pass model inputs by name (input_ids=..., ...)")
                kwargs["input_ids"] = args[0]
            return self._forward_named({k: kwargs.pop(k, None) for k in
                                        ("input_ids", "attention_mask", "inputs_embeds", "labels")}, kwargs)
        with self._adapter_names(args, kwargs):
            return self.get_base_model()(*args, **self._model_kwargs(kwargs))

    def _forward_named(self, named: dict, kwargs: dict):
        if self._is_prompt_learning:
            named = dict(named)
            main = {k: named.pop(k, None) for k in ("input_ids", "attention_mask", "inputs_embeds", "labels")}
            kwargs = self._model_kwargs(kwargs)
            if named.get("token_type_ids") is not None:
                kwargs["token_type_ids"] = named.pop("token_type_ids")
            named.pop("token_type_ids", None)
            if named.get("position_ids") is not None:
                kwargs["position_ids"] = named.pop("position_ids")
            named.pop("position_ids", None)
            return self._prompt_forward(self._prompt_task, **main, kwargs=kwargs, extra=named)
        # None means "the model's default" for every transformers forward argument; leaving them out
        # also lets models without some of these arguments work
        named = {k: v for k, v in named.items() if v is not None}
        with self._adapter_names((), dict(named, **kwargs)):  # (a copy: _model_kwargs drops adapter_names)
            return self.base_model(**named, **self._model_kwargs(kwargs))

    def generate(self, *args, **kwargs):
        """The base model's generate (task classes override this); takes adapter_names=[...] like forward."""
        if self._is_prompt_learning:
            return self.get_base_model().generate(*args, **kwargs)
        with self._adapter_names(args, kwargs):
            return self.get_base_model().generate(*args, **self._model_kwargs(kwargs))

    def _generate(self, seq2seq: bool, args: tuple, kwargs: dict):
        if not self._is_prompt_learning:
            with self._adapter_names(args, kwargs):
                return self.get_base_model().generate(*args, **self._model_kwargs(kwargs))
        if args:
            if len(args) > 1 or "input_ids" in kwargs:
                raise TypeError("generate(): pass at most one positional argument (input_ids)")
            kwargs["input_ids"] = args[0]
        return self._prompt_generate(seq2seq, self._model_kwargs(kwargs))

    # ---------------------------------------------------------------------------------------------
    # adapters
    # ---------------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Create a new (inactive) adapter from ``peft_config``; set_adapter() activates it."""
        validate_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; existing adapters: {list(self.peft_config)}")
        _check_config(peft_config)
        if self._is_prompt_learning or peft_config.is_prompt_learning:
            if not (self._is_prompt_learning and peft_config.is_prompt_learning):
                raise ValueError(f"Cannot add a {peft_config.peft_type} adapter to a model holding {self.peft_type} "
                                 f"adapters: prompt-learning and layer adapters do not mix in one PeftModel")
            self._fill_config_from_model(peft_config, self.get_base_model())
            self._add_task_heads(peft_config)
            self._add_prompt_adapter(adapter_name, peft_config)
            return
        if getattr(peft_config.peft_type, "value", peft_config.peft_type) != getattr(self.peft_type, "value", self.peft_type):
            raise ValueError(
                f"Cannot add a {peft_config.peft_type} adapter to a model holding {self.peft_type} adapters."
            )
        self._fill_config_from_model(peft_config, self.get_base_model())
        self._add_task_heads(peft_config)
        self.base_model.peft_config[adapter_name] = peft_config
        try:
            from fastpeft.tuners.tuners_utils import requires_grad_kept

            with requires_grad_kept(self.base_model.model, adapter_name):
                self.base_model.inject_adapter(self.base_model.model, adapter_name,
                                               low_cpu_mem_usage=low_cpu_mem_usage)
        except BaseException:
            # roll back whatever was created before the failure
            try:
                self.base_model.delete_adapter(adapter_name)
            except Exception:
                pass
            self.base_model.peft_config.pop(adapter_name, None)
            raise
        self._keep_active_adapter_in_new_layers()
        self._update_modules_to_save(peft_config)
        self._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)

    def _keep_active_adapter_in_new_layers(self) -> None:
        # A LoRA layer created for the new adapter starts with that adapter active, while the model's
        # active adapter stays what it was (peft's behaviour: adding never activates). Align those
        # layers; their only adapter is the new, inactive one, which also becomes frozen.
        active = self.active_adapters
        for _, layer in self.base_model.model.named_modules():
            if is_lora_layer(layer) and list(layer.active_adapters) != active:
                layer.set_adapter(self.active_adapter)

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Activate ``adapter_name``; its weights require grad unless ``inference_mode=True`` (peft's signature)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(f"Adapter {missing[0]!r} not found; existing adapters: {list(self.peft_config)}")
        if self._is_prompt_learning:
            if len(names) != 1:
                raise ValueError(f"Prompt-learning adapters cannot be active together; got {names}")
            self._set_prompt_adapter(names[0])
            if inference_mode:  # peft freezes the modules_to_save copies here (not the prompt encoder)
                for m in self.modules():
                    if is_modules_to_save_wrapper(m):
                        m.set_requires_grad(names[0], requires_grad=False)
            return
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names: Union[str, list[str]], requires_grad: bool = True) -> None:
        """Gradients on/off for the given adapters' weights, active or not (peft's method; LoRA adapters)."""
        if self._is_prompt_learning:
            raise TypeError(f"Setting `requires_grad` is not supported for prompt learning methods like "
                            f"{getattr(self.peft_type, 'value', self.peft_type)}.")
        self.base_model.set_requires_grad(adapter_names, requires_grad=requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} does not exist; existing adapters: {list(self.peft_config)}")
        if self._is_prompt_learning:
            self._delete_prompt_adapter(adapter_name)
            return
        self.base_model.delete_adapter(adapter_name)

    @contextmanager
    def disable_adapter(self):
        """Run the base model without adapters inside the ``with`` block; restores everything after."""
        # disabling/enabling flips requires_grad in the layers; put back exactly what was there
        grads = {p: p.requires_grad for p in self.parameters()}
        if self._is_prompt_learning:
            disable = lambda: self._enable_prompt(False)  # noqa: E731
            enable = lambda: self._enable_prompt(True)  # noqa: E731
        else:
            disable, enable = self.base_model.disable_adapter_layers, self.base_model.enable_adapter_layers
        disable()
        try:
            yield
        finally:
            enable()
            for p, flag in grads.items():
                p.requires_grad_(flag)

    def _enable_prompt(self, enabled: bool) -> None:
        self._prompt_disabled = not enabled
        for wrapper in self._prompt_wrappers():
            wrapper.enable_adapters(enabled)

    def _refuse_merge(self, what: str) -> None:
        if self._is_prompt_learning:
            raise ValueError(f"{what}: prompt-learning adapters ({self.peft_type}) add virtual tokens and have no "
                             f"weights to merge into the model")

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._refuse_merge("merge_adapter")
        self.base_model.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self._refuse_merge("unmerge_adapter")
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        self._refuse_merge("merge_and_unload")
        return self.base_model.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge,
                                                adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        self._refuse_merge("unload")
        return self.base_model.unload()

    # ---------------------------------------------------------------------------------------------
    # saving
    # ---------------------------------------------------------------------------------------------
    def _config_to_save(self, adapter_name: str) -> tuple[PeftConfig, Optional[dict]]:
        cfg = copy.copy(self.peft_config[adapter_name])
        cfg.inference_mode = True  # a saved adapter loads frozen unless asked otherwise
        if cfg.base_model_name_or_path is None:
            cfg.base_model_name_or_path = _model_name_or_path(self.get_base_model())
        auto_mapping = None
        if cfg.task_type is None:
            # no task class to find the base model class from: record it (AutoPeftModel reads it)
            base_cls = type(self.get_base_model())
            auto_mapping = {"base_model_class": base_cls.__name__, "parent_library": base_cls.__module__}
        return cfg, auto_mapping

    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        selected_adapters: Optional[list[str]] = None, save_embedding_layers: Union[str, bool] = "auto",
                        is_main_process: Optional[bool] = None,
                        path_initial_model_for_weight_conversion: Optional[str] = None, **kwargs: Any) -> None:
        """Write each selected adapter: "default" into ``save_directory``, others into ``save_directory/<name>``.

        Files: adapter_config.json, adapter_model.safetensors (or adapter_model.bin with
        safe_serialization=False), and README.md in ``save_directory``. All files are written into a
        temporary folder first and moved into place at the end, so an error leaves the old files intact.

        ``state_dict=`` (as in peft): take the adapter tensors from this state dict instead of the
        model's (keys as the model's state_dict, with or without a ``module.`` wrapper prefix).
        ``state_dict=None`` given explicitly on a process that does not write returns at once (what
        accelerate's ``get_state_dict`` gives ranks other than 0 under ZeRO-3).

        Distributed training (DDP, FSDP1, FSDP2, DeepSpeed ZeRO-3): call this on every rank. Sharded
        adapter tensors are gathered here (collectives every rank takes part in); only the main
        process writes. ``is_main_process`` defaults to "rank 0 of torch.distributed" when a process
        group is initialized (else True); pass it to choose the writer yourself (e.g. one per node).
        """
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_pretrained: {save_directory!r} is a file; expected a directory")
        if selected_adapters is None:
            selected_adapters = list(self.peft_config)
        else:
            unknown = [a for a in selected_adapters if a not in self.peft_config]
            if unknown:
                raise ValueError(f"selected_adapters contains unknown adapters {unknown}; existing adapters: "
                                 f"{list(self.peft_config)}")
        for name in selected_adapters:
            validate_adapter_name(name)  # names become folder names
        from fastpeft.utils.save_and_load import adapter_state_dicts, distributed_rank

        if is_main_process is None:
            is_main_process = distributed_rank() == 0
        given = "state_dict" in kwargs
        state_dict = kwargs.pop("state_dict", None)
        if given and state_dict is None and not is_main_process:
            # accelerate's get_state_dict under ZeRO-3 returns None off rank 0: the main process was given
            # full tensors and gathers nothing, so this rank must not enter a gather either
            return
        # Every rank gathers (FSDP2 / ZeRO-3 / FSDP1 gathers are collectives); only the main process writes.
        adapters = adapter_state_dicts(self, selected_adapters, state_dict, save_embedding_layers).items()
        if not is_main_process:
            return

        weights_name = SAFETENSORS_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME
        other_name = WEIGHTS_NAME if safe_serialization else SAFETENSORS_WEIGHTS_NAME
        stale: list[str] = []  # weights in the other format, removed once the new ones are in place
        # Every file is written into a staging folder first and moved into place only once all were written.
        with staged_folder(save_directory) as staging:
            saved = []
            for name, weights in adapters:
                rel = "" if name == "default" else name
                stage_dir = os.path.join(staging, rel)
                os.makedirs(stage_dir, exist_ok=True)
                if path_initial_model_for_weight_conversion is not None:  # PiSSA/OLoRA/... -> plain LoRA
                    from fastpeft.tuners.lora import weight_conversion as _conv
                    weights = _conv.weights_for_initial_model(self, name, weights,
                                                              os.fspath(path_initial_model_for_weight_conversion))
                write_weights(weights, os.path.join(stage_dir, weights_name), safe_serialization=safe_serialization)
                cfg, auto_mapping = self._config_to_save(name)
                if path_initial_model_for_weight_conversion is not None:
                    cfg = _conv.converted_config(cfg)
                cfg.save_pretrained(stage_dir, auto_mapping_dict=auto_mapping)
                stale.append(os.path.join(save_directory, rel, other_name))
                saved.append((name, cfg))
            base = next((c.base_model_name_or_path for _, c in saved if c.base_model_name_or_path), None)
            card = model_card_text_for(save_directory, saved, base, model=self)
            if card is not None:
                with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as fh:
                    fh.write(card)
        for path in stale:
            if os.path.isfile(path):
                os.remove(path)

    # ---------------------------------------------------------------------------------------------
    # loading
    # ---------------------------------------------------------------------------------------------
    @staticmethod
    def _read_adapter(model_id: str, config: Optional[PeftConfig], torch_device: Optional[str], kwargs: dict):
        """(config, weights, weights file) for an adapter folder / Hub repo; nothing in the model changes."""
        subfolder = kwargs.get("subfolder")
        hub = _hub_kwargs(kwargs)
        if config is None:
            config = PeftConfig.from_pretrained(model_id, **{**hub, "subfolder": subfolder})
        path = find_weights_file(model_id, subfolder=subfolder, **hub)
        return config, load_weights_file(path, device=torch_device), path

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default", is_trainable: bool = False,
                        config: Optional[PeftConfig] = None, autocast_adapter_dtype: bool = True,
                        ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False, **kwargs: Any) -> "PeftModel":
        """Load the adapter saved in ``model_id`` (a folder or Hub repo id) onto ``model``.

        The returned object is the task class named by the config's task_type (as in peft). With
        is_trainable=False (default) the adapter is frozen and the model is put in eval mode.
        kwargs: subfolder, revision, token, cache_dir, ... (Hub options), ignore_mismatched_sizes,
        torch_device. ephemeral_gpu_offload is accepted for peft signature compatibility. low_cpu_mem_usage:
        the LoRA weights are created on the meta device without initialisation and the load puts the file's
        tensors in their place (peft's option; the result is the same).
        """
        validate_adapter_name(adapter_name)
        ignore_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
        torch_device = kwargs.pop("torch_device", None)
        config, weights, path = cls._read_adapter(model_id, config, torch_device, kwargs)
        _check_config(config)
        _refuse_trainable_prompt(config, is_trainable)
        config.inference_mode = not is_trainable
        target_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(getattr(config.task_type, "value", config.task_type), cls)

        grads = {n: p.requires_grad for n, p in model.named_parameters()}
        # only a model that had no adapters before can be restored by stripping all adapter modules
        restorable = not any(is_lora_layer(m) or is_modules_to_save_wrapper(m) for m in model.modules())
        try:
            peft_model = target_cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                    low_cpu_mem_usage=low_cpu_mem_usage)
            set_peft_model_state_dict(peft_model, weights, adapter_name=adapter_name,
                                      ignore_mismatched_sizes=ignore_mismatched, source=path,
                                      low_cpu_mem_usage=low_cpu_mem_usage)
        except BaseException:
            if restorable:  # give the caller their model back as it was
                _strip_tuner(model)
                for n, p in model.named_parameters():
                    if n in grads:
                        p.requires_grad_(grads[n])
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False,
                     torch_device: Optional[str] = None, autocast_adapter_dtype: bool = True,
                     ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False, **kwargs: Any):
        """Load the adapter in ``model_id`` as ``adapter_name`` (new, or overwriting an existing one's weights).

        Does not change the active adapter. Returns the load result (missing_keys, unexpected_keys).
        ephemeral_gpu_offload is accepted for peft compatibility; low_cpu_mem_usage as in from_pretrained.
        """
        validate_adapter_name(adapter_name)
        ignore_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
        is_new = adapter_name not in self.peft_config
        config = kwargs.pop("config", None)
        config, weights, path = self._read_adapter(model_id, config if is_new else self.peft_config[adapter_name],
                                                   torch_device, kwargs)
        if is_new:
            _check_config(config)
            _refuse_trainable_prompt(config, is_trainable)
            config.inference_mode = not is_trainable
            self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype,
                             low_cpu_mem_usage=low_cpu_mem_usage)
            if is_trainable and not self._is_prompt_learning:
                # a new adapter is added frozen (inactive); is_trainable asks for gradients on it (peft)
                self.set_requires_grad(adapter_name)
        try:
            result = set_peft_model_state_dict(self, weights, adapter_name=adapter_name,
                                               ignore_mismatched_sizes=ignore_mismatched, source=path,
                                               low_cpu_mem_usage=low_cpu_mem_usage)
        except BaseException:
            if is_new:
                self.delete_adapter(adapter_name)
            raise
        if not is_trainable:
            self.eval()
        return result


# -------------------------------------------------------------------------------------------------
# task classes: forward signatures follow peft's (argument order matters for positional calls, and
# transformers' Trainer reads the names to decide which dataset columns to keep)
# -------------------------------------------------------------------------------------------------
def _labelled_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                      output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
    """forward() of the decoder-only and classification task classes (same arguments in peft)."""
    return self._forward_named(dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                    labels=labels, output_attentions=output_attentions,
                                    output_hidden_states=output_hidden_states, return_dict=return_dict), kwargs)


class PeftModelForCausalLM(PeftModel):
    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs) -> None:
        super().__init__(model, peft_config, adapter_name, **kwargs)
        self.base_model_torch_dtype = getattr(model, "dtype", None)

    forward = _labelled_forward

    _prompt_task = TaskType.CAUSAL_LM.value

    def generate(self, *args, **kwargs):
        return self._generate(False, args, kwargs)


class PeftModelForSeq2SeqLM(PeftModel):
    _prompt_task = TaskType.SEQ_2_SEQ_LM.value

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        return self._forward_named(dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                        decoder_input_ids=decoder_input_ids,
                                        decoder_attention_mask=decoder_attention_mask,
                                        decoder_inputs_embeds=decoder_inputs_embeds, labels=labels,
                                        output_attentions=output_attentions,
                                        output_hidden_states=output_hidden_states, return_dict=return_dict), kwargs)

    def generate(self, *args, **kwargs):
        return self._generate(True, args, kwargs)


class PeftModelForSequenceClassification(PeftModel):
    _prompt_task = TaskType.SEQ_CLS.value
    _auto_modules_to_save = ("classifier", "score")

    forward = _labelled_forward


class PeftModelForTokenClassification(PeftModel):
    _prompt_task = TaskType.TOKEN_CLS.value
    _auto_modules_to_save = ("classifier", "score")

    forward = _labelled_forward


class PeftModelForQuestionAnswering(PeftModel):
    _prompt_task = TaskType.QUESTION_ANS.value
    _auto_modules_to_save = ("qa_outputs",)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                start_positions=None, end_positions=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, task_ids=None, **kwargs):
        return self._forward_named(dict(input_ids=input_ids, attention_mask=attention_mask,
                                        token_type_ids=token_type_ids, position_ids=position_ids,
                                        inputs_embeds=inputs_embeds, start_positions=start_positions,
                                        end_positions=end_positions, output_attentions=output_attentions,
                                        output_hidden_states=output_hidden_states, return_dict=return_dict), kwargs)


class PeftModelForFeatureExtraction(PeftModel):
    _prompt_task = TaskType.FEATURE_EXTRACTION.value
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        return self._forward_named(dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                        output_attentions=output_attentions,
                                        output_hidden_states=output_hidden_states, return_dict=return_dict), kwargs)


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type] = {
    TaskType.SEQ_CLS.value: PeftModelForSequenceClassification,
    TaskType.SEQ_2_SEQ_LM.value: PeftModelForSeq2SeqLM,
    TaskType.CAUSAL_LM.value: PeftModelForCausalLM,
    TaskType.TOKEN_CLS.value: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS.value: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION.value: PeftModelForFeatureExtraction,
}
