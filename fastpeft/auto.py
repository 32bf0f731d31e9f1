"""AutoPeftModel*: load base model + adapter from one adapter folder (or Hub repo) in one call.

The adapter's adapter_config.json says which base model to load (``base_model_name_or_path``) and,
through ``task_type``, which transformers auto class and PeftModel task class to use. Adapters
without a task type carry ``auto_mapping`` (the base model's class and module) instead; only the
task-less ``AutoPeftModel`` accepts those.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Optional

from fastpeft.config import PeftConfig
from fastpeft.peft_model import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel, _hub_kwargs
from fastpeft.utils.peft_types import TaskType
from fastpeft.utils.tasks import TASKS

__all__ = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForFeatureExtraction",
]

# kwargs that belong to the adapter loading (PeftModel.from_pretrained), not to the base model loading
_ADAPTER_KWARGS = ("autocast_adapter_dtype", "ephemeral_gpu_offload", "low_cpu_mem_usage", "ignore_mismatched_sizes",
                   "torch_device")


class _BaseAutoPeftModel:
    _task: Optional[TaskType] = None  # the task a subclass loads; None: AutoPeftModel, for task-less adapters
    _target_class: Optional[str] = None  # name of the transformers auto class for the base model
    _target_peft_class: type = PeftModel

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # both classes come from the task tables, so a task's classes are named in one place only; only for
        # a class that sets _task itself, so that a user's subclass can still override the two targets
        if cls.__dict__.get("_task") is not None:
            cls._target_class = TASKS[cls._task].auto_class
            cls._target_peft_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[cls._task]

    def __init__(self, *args, **kwargs):
        raise EnvironmentError(f"{type(self).__name__} is not meant to be instantiated; use "
                               f"{type(self).__name__}.from_pretrained(path)")

    @classmethod
    def _base_model_class(cls, peft_config: PeftConfig, config_source: str):
        task = getattr(peft_config.task_type, "value", peft_config.task_type)
        if task is not None:
            expected = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task)
            if cls._target_class is None:
                raise ValueError(
                    f"{config_source} has task_type={task!r}: load it with the matching class "
                    f"(e.g. AutoPeftModelForCausalLM for CAUSAL_LM), not AutoPeftModel."
                )
            if expected is not None and expected is not cls._target_peft_class:
                raise ValueError(
                    f"{cls.__name__} loads {cls._target_peft_class.__name__} adapters, but {config_source} has "
                    f"task_type={task!r}, which needs {expected.__name__}."
                )
            import transformers

            return getattr(transformers, cls._target_class)
        if cls._target_class is not None:
            import transformers

            return getattr(transformers, cls._target_class)
        mapping = peft_config.auto_mapping or {}
        if mapping.get("base_model_class") and mapping.get("parent_library"):
            module = importlib.import_module(mapping["parent_library"])
            return getattr(module, mapping["base_model_class"])
        raise ValueError(
            f"Cannot tell which model class to load for {config_source}: it has neither a task_type nor an "
            f"auto_mapping. Load the base model yourself and use PeftModel.from_pretrained(model, path)."
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        revision: Optional[str] = None, **kwargs: Any) -> PeftModel:
        """Load the base model named in the adapter's config, then the adapter on top of it.

        kwargs go to the base model's ``from_pretrained`` (e.g. dtype, device_map) and, where they are
        Hub options (token, cache_dir, subfolder), to the adapter file lookup as well.
        """
        path = os.fspath(pretrained_model_name_or_path)
        hub = _hub_kwargs(kwargs)
        subfolder = kwargs.pop("subfolder", None)
        peft_config = config or PeftConfig.from_pretrained(path, subfolder=subfolder, revision=revision, **hub)
        source = os.path.join(path, subfolder or "", "adapter_config.json")
        base_path = peft_config.base_model_name_or_path
        if not base_path:
            raise ValueError(f"{source} has no base_model_name_or_path, so the base model to load is unknown; "
                             f"load it yourself and use PeftModel.from_pretrained(model, path).")
        model_cls = cls._base_model_class(peft_config, source)
        adapter_kwargs = {k: kwargs.pop(k) for k in _ADAPTER_KWARGS if k in kwargs}
        base_model = model_cls.from_pretrained(base_path, revision=peft_config.revision, **kwargs)
        cls._resize_to_saved_tokenizer(base_model, path, subfolder)
        if revision is not None:  # the adapter's revision (the base model's is peft_config.revision)
            hub["revision"] = revision
        peft_cls = cls._target_peft_class
        return peft_cls.from_pretrained(base_model, path, adapter_name=adapter_name, is_trainable=is_trainable,
                                        config=peft_config, subfolder=subfolder, **hub, **adapter_kwargs)

    @staticmethod
    def _resize_to_saved_tokenizer(model, path: str, subfolder: Optional[str]) -> None:
        # an adapter saved together with a tokenizer that added tokens needs the embeddings resized
        folder = os.path.join(path, subfolder or "")
        if not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
            return
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embeddings is not None and embeddings.weight.shape[0] != len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))


class AutoPeftModel(_BaseAutoPeftModel):
    """For adapters saved without a task type: the base model class comes from their auto_mapping."""


class AutoPeftModelForCausalLM(_BaseAutoPeftModel):
    _task = TaskType.CAUSAL_LM


class AutoPeftModelForSeq2SeqLM(_BaseAutoPeftModel):
    _task = TaskType.SEQ_2_SEQ_LM


class AutoPeftModelForSequenceClassification(_BaseAutoPeftModel):
    _task = TaskType.SEQ_CLS


class AutoPeftModelForTokenClassification(_BaseAutoPeftModel):
    _task = TaskType.TOKEN_CLS


class AutoPeftModelForQuestionAnswering(_BaseAutoPeftModel):
    _task = TaskType.QUESTION_ANS


class AutoPeftModelForFeatureExtraction(_BaseAutoPeftModel):
    _task = TaskType.FEATURE_EXTRACTION
