"""The prompt-learning side of PeftModel: virtual tokens in front of the input, or a key/value prefix.

For these methods peft's PeftModel holds the user's model directly as ``base_model`` (no tuner in
between), the per-adapter prompt networks in ``prompt_encoder`` (a ModuleDict) and the model's input
embedding as ``word_embeddings``; fastpeft keeps that layout, so state_dict keys and the saved
``prompt_embeddings`` tensor are the same as peft's. ``PromptLearningMixin`` is mixed into PeftModel;
its methods are used only when the adapter is a prompt-learning one.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Optional

import torch
from torch import nn

from fastpeft.tuners.tuners_utils import get_submodules
from fastpeft.tuners.modules_to_save import ModulesToSaveWrapper, matches_modules_to_save
from fastpeft.utils.peft_types import PeftType, TaskType

from .prefix_encoder import PrefixEncoder, build_prefix_cache
from .prompt_encoder import PromptEncoder
from .prompt_embedding import PromptEmbedding


def _value(x):
    return getattr(x, "value", x)


def _first_attr(cfg, names):
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def model_prompt_dims(model: nn.Module, peft_type, task_type) -> dict:
    """token_dim, num_layers, num_attention_heads, num_transformer_submodules read from the model's config.

    Values the config does not have are None. For prefix tuning on models with grouped-query attention
    the prefix is stored per key/value head, so token_dim and num_attention_heads describe the
    key/value heads (what peft writes into adapter_config.json for such models).
    """
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    dims = {
        "num_layers": _first_attr(cfg, ("num_hidden_layers", "num_layers", "n_layer")),
        "token_dim": _first_attr(cfg, ("hidden_size", "n_embd", "d_model")),
        "num_attention_heads": _first_attr(cfg, ("num_attention_heads", "n_head", "num_heads")),
        "num_transformer_submodules": 2 if _value(task_type) == TaskType.SEQ_2_SEQ_LM.value else 1,
    }
    kv_heads = _first_attr(cfg, ("num_key_value_heads",))
    heads, dim = dims["num_attention_heads"], dims["token_dim"]
    if _value(peft_type) == PeftType.PREFIX_TUNING.value and kv_heads and heads and dim and kv_heads != heads:
        dims["token_dim"] = dim // heads * kv_heads
        dims["num_attention_heads"] = kv_heads
    return dims


def fill_prompt_config(config, model: nn.Module, word_embeddings: nn.Module) -> None:
    """Fill the model-dependent fields left None, then check every field against the model.

    Mismatches raise ValueError naming the field, the configured value and the model's value (a
    config saved for a different base model must not load with a confusing shape error later).
    """
    owner = type(config).__name__
    if config.num_virtual_tokens is None:
        raise ValueError(f"{owner}.num_virtual_tokens must be set to a positive integer, got None")
    dims = model_prompt_dims(model, config.peft_type, config.task_type)
    for name, value in dims.items():
        if getattr(config, name) is None:
            if value is None:
                raise ValueError(f"{owner}.{name} is None and the model's config does not say what it is; set "
                                 f"{name} in the config")
            setattr(config, name, value)
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        # peft writes the width it used into the file
        config.encoder_hidden_size = config.token_dim
    is_prefix = _value(config.peft_type) == PeftType.PREFIX_TUNING.value
    if not is_prefix:
        # the prompt is concatenated to the word embeddings: it must have their width
        width = word_embeddings.weight.shape[-1]
        if config.token_dim != width:
            raise ValueError(f"{owner}.token_dim={config.token_dim} does not match the model: its input embeddings "
                             f"have width {width} (the config was probably made for another base model)")
    else:
        for name in ("token_dim", "num_layers", "num_attention_heads"):
            if dims[name] is not None and getattr(config, name) != dims[name]:
                raise ValueError(f"{owner}.{name}={getattr(config, name)} does not match the model, which has "
                                 f"{name}={dims[name]} (the config was probably made for another base model)")


def build_prompt_module(config, word_embeddings: nn.Module) -> nn.Module:
    kind = _value(config.peft_type)
    if kind == PeftType.PROMPT_TUNING.value:
        return PromptEmbedding(config, word_embeddings)
    if kind == PeftType.P_TUNING.value:
        return PromptEncoder(config)
    if kind == PeftType.PREFIX_TUNING.value:
        return PrefixEncoder(config)
    raise NotImplementedError(f"fastpeft does not implement the prompt-learning method {kind!r} yet "
                              f"(implemented: PROMPT_TUNING, P_TUNING, PREFIX_TUNING)")


def _cache_argument(module: nn.Module) -> Optional[str]:
    """The forward argument that takes a Cache: ``cache`` (transformers >= 5.2x), ``past_key_values``, or None.

    Only explicit parameters count: encoder models such as RoBERTa pass **kwargs on but do not
    declare a cache, and peft 0.21 refuses prefix tuning on them as well.
    """
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def _checkpointing(model: nn.Module) -> bool:
    flag = getattr(model, "is_activation_checkpointing", None)
    if flag is None:
        flag = model.__dict__.get("is_gradient_checkpointing", False)
    return flag is True


class PromptLearningMixin:
    """Prompt-learning state and behaviour of PeftModel (attributes exist only for such adapters)."""

    # ------------------------------------------------------------------ setup / adapters
    def _init_prompt_learning(self, model: nn.Module, peft_config, adapter_name: str) -> None:
        self._prompt_configs = {}
        self._prompt_active = adapter_name
        self._prompt_disabled = False
        self.base_model = model
        self.prompt_encoder = nn.ModuleDict({})
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embeddings is None:
            raise ValueError(f"{type(model).__name__} has no input embeddings (get_input_embeddings() returned "
                             f"nothing); prompt learning prepends virtual tokens to them")
        self.word_embeddings = embeddings
        self._check_prompt_config(peft_config)  # before the model is touched: a bad config leaves it as it was
        for p in model.parameters():  # only the prompt (and task heads) train
            p.requires_grad_(False)
        self._add_prompt_adapter(adapter_name, peft_config)

    def _check_prompt_config(self, peft_config) -> None:
        if _value(peft_config.peft_type) == PeftType.PREFIX_TUNING.value and _checkpointing(self.base_model):
            # checkpointed layers rerun their forward in backward and would append the prefix to the
            # cache a second time; peft 0.21 refuses this combination as well
            raise ValueError(f"PREFIX_TUNING does not work with gradient checkpointing, which is enabled on "
                             f"{type(self.base_model).__name__}; call model.gradient_checkpointing_disable() first "
                             f"or use prompt tuning / p-tuning")
        fill_prompt_config(peft_config, self.base_model, self.word_embeddings)

    def _add_prompt_adapter(self, adapter_name: str, peft_config) -> None:
        self._check_prompt_config(peft_config)
        module = build_prompt_module(peft_config, self.word_embeddings)
        module.to(self.word_embeddings.weight.device)
        self.prompt_encoder[adapter_name] = module
        self._prompt_configs[adapter_name] = peft_config
        self._wrap_prompt_modules_to_save(peft_config, adapter_name)
        if adapter_name != self._prompt_active:
            # a new adapter stays inactive: its copies of the task heads do not train yet
            self._set_prompt_adapter(self._prompt_active)

    def _wrap_prompt_modules_to_save(self, peft_config, adapter_name: str) -> None:
        names = list(peft_config.modules_to_save or [])
        if not names:
            return
        self.modules_to_save = set(self.modules_to_save or ()) | set(names)
        keys = [k for k, _ in self.base_model.named_modules() if k and matches_modules_to_save(k, names)]
        for key in keys:
            target = self.base_model.get_submodule(key)
            if isinstance(target, ModulesToSaveWrapper):
                target.update(adapter_name)
                continue
            if any(isinstance(m, ModulesToSaveWrapper) for m in self._parents(key)):
                continue  # inside a wrapper that already copies it
            parent, _, attr = get_submodules(self.base_model, key)
            setattr(parent, attr, ModulesToSaveWrapper(target, adapter_name))

    def _parents(self, key: str):
        parts = key.split(".")
        for i in range(1, len(parts)):
            yield self.base_model.get_submodule(".".join(parts[:i]))

    def _prompt_wrappers(self):
        return [m for m in self.base_model.modules() if isinstance(m, ModulesToSaveWrapper)]

    def _set_prompt_adapter(self, adapter_name: str) -> None:
        self._prompt_active = adapter_name
        for wrapper in self._prompt_wrappers():
            wrapper.set_adapter(adapter_name)

    def _delete_prompt_adapter(self, adapter_name: str) -> None:
        del self.prompt_encoder[adapter_name]
        del self._prompt_configs[adapter_name]
        for wrapper in self._prompt_wrappers():
            wrapper.delete_adapter(adapter_name)
        if adapter_name == self._prompt_active:
            remaining = list(self._prompt_configs)
            if remaining:
                warnings.warn(f"Adapter {adapter_name!r} was active and is deleted; {remaining[0]!r} is active now")
                self._set_prompt_adapter(remaining[0])

    # ------------------------------------------------------------------ prompts
    def _prompt_config(self):
        return self._prompt_configs[self._prompt_active]

    def _prompt_table(self, adapter_name: str) -> torch.Tensor:
        """The adapter's prompt rows [T, D]: T = total virtual tokens (prefix: num_virtual_tokens)."""
        config = self._prompt_configs[adapter_name]
        module = self.prompt_encoder[adapter_name]
        if config.inference_mode:
            # a loaded adapter holds the final table already; no network to run
            return module.embedding.weight
        rows = module.embedding.weight.shape[0]
        return module(torch.arange(rows, device=module.embedding.weight.device))

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """What peft writes as ``prompt_embeddings``: the prompt table as the model uses it."""
        module = self.prompt_encoder[adapter_name]
        was_training = module.training
        module.eval()  # LSTM dropout off: the saved prompt is the deterministic one
        try:
            with torch.no_grad():
                return self._prompt_table(adapter_name).detach().cpu()
        finally:
            module.train(was_training)

    def get_prompt(self, batch_size: int, task_ids=None):
        """Virtual-token embeddings [batch, T, D], or for prefix tuning the prefix as a transformers Cache."""
        if task_ids is not None:
            raise NotImplementedError("task_ids are for multitask prompt tuning, which fastpeft does not implement")
        config = self._prompt_config()
        table = self._prompt_table(self._prompt_active)
        table = table.unsqueeze(0).expand(batch_size, -1, -1)
        if _value(config.peft_type) == PeftType.PREFIX_TUNING.value:
            return build_prefix_cache(table, config, self.word_embeddings.weight.dtype)
        return table

    # ------------------------------------------------------------------ forward
    def _prompt_is_prefix(self) -> bool:
        return _value(self._prompt_config().peft_type) == PeftType.PREFIX_TUNING.value

    def _check_prefix_support(self) -> str:
        # inspect.signature is slow for a per-step call: remember the answer for this forward function
        fwd = getattr(self.base_model.forward, "__func__", self.base_model.forward)
        cached = self.__dict__.get("_cache_arg_for")
        if cached is None or cached[0] is not fwd:
            cached = self.__dict__["_cache_arg_for"] = (fwd, _cache_argument(self.base_model))
        name = cached[1]
        if name is None:
            raise ValueError(
                f"Prefix tuning needs a model whose forward takes a key/value cache (past_key_values); "
                f"{type(self.base_model).__name__}.forward does not (use prompt tuning or p-tuning for it)"
            )
        return name

    @staticmethod
    def _batch_size(input_ids, inputs_embeds) -> int:
        if input_ids is not None:
            return input_ids.shape[0]
        if inputs_embeds is not None:
            return inputs_embeds.shape[0]
        raise ValueError("Pass input_ids or inputs_embeds")

    @staticmethod
    def _extend_mask(attention_mask, n: int, batch: int):
        if attention_mask is None:
            return None
        ones = torch.ones(batch, n, dtype=attention_mask.dtype, device=attention_mask.device)
        return torch.cat([ones, attention_mask], dim=1)

    def _prompt_forward(self, task: Optional[str], input_ids=None, attention_mask=None, inputs_embeds=None,
                        labels=None, kwargs: Optional[dict] = None, extra: Optional[dict] = None):
        """Run the base model with the active prompt adapter for ``task`` (a TaskType value or None)."""
        kwargs = dict(kwargs or {})
        extra = {k: v for k, v in (extra or {}).items() if v is not None}
        named = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels)
        if self._prompt_disabled:
            named = {k: v for k, v in named.items() if v is not None}
            return self.base_model(**named, **extra, **kwargs)
        config = self._prompt_config()
        nvt = config.num_virtual_tokens
        batch = self._batch_size(input_ids, inputs_embeds)
        if kwargs.get("position_ids") is not None:
            warnings.warn("position_ids are ignored with prompt learning: the virtual tokens shift every position")
        kwargs.pop("position_ids", None)
        seq2seq = task == TaskType.SEQ_2_SEQ_LM.value
        token_type_ids = kwargs.pop("token_type_ids", None)
        if token_type_ids is not None:
            if task in (TaskType.SEQ_CLS.value, TaskType.TOKEN_CLS.value, TaskType.QUESTION_ANS.value,
                        TaskType.FEATURE_EXTRACTION.value) and not self._prompt_is_prefix():
                zeros = torch.zeros(batch, nvt, dtype=token_type_ids.dtype, device=token_type_ids.device)
                kwargs["token_type_ids"] = torch.cat([zeros, token_type_ids], dim=1)
            elif self._prompt_is_prefix():
                kwargs["token_type_ids"] = token_type_ids
            else:
                warnings.warn("token_type_ids are ignored with prompt learning for this task")

        if self._prompt_is_prefix():
            cache_arg = self._check_prefix_support()
            past = self.get_prompt(batch)
            if not seq2seq:
                attention_mask = self._extend_mask(attention_mask, nvt, batch)
            named = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                         labels=labels)
            named[cache_arg] = past
            named = {k: v for k, v in named.items() if v is not None}
            return self.base_model(**named, **extra, **kwargs)

        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        prompts = self.get_prompt(batch).to(inputs_embeds.dtype)
        if seq2seq:
            prompts = prompts[:, :nvt]  # the encoder gets the first num_virtual_tokens rows
        inputs_embeds = torch.cat([prompts, inputs_embeds], dim=1)
        attention_mask = self._extend_mask(attention_mask, nvt, batch)
        if labels is not None and task in (TaskType.CAUSAL_LM.value, TaskType.TOKEN_CLS.value):
            # no loss on the virtual tokens
            pad = torch.full((batch, nvt), -100, dtype=labels.dtype, device=labels.device)
            labels = torch.cat([pad, labels], dim=1)
        named = dict(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels)
        named = {k: v for k, v in named.items() if v is not None}
        return self.base_model(**named, **extra, **kwargs)

    # ------------------------------------------------------------------ generation
    def _prompt_generate(self, seq2seq: bool, kwargs: dict):
        kwargs = dict(kwargs)
        if self._prompt_disabled:
            return self.base_model.generate(**kwargs)
        config = self._prompt_config()
        nvt = config.num_virtual_tokens
        input_ids = kwargs.pop("input_ids", None)
        inputs_embeds = kwargs.pop("inputs_embeds", None)
        attention_mask = kwargs.pop("attention_mask", None)
        kwargs.pop("position_ids", None)
        kwargs.pop("token_type_ids", None)
        batch = self._batch_size(input_ids, inputs_embeds)
        if not seq2seq:
            self._shift_max_length(kwargs, nvt)
        if self._prompt_is_prefix():
            if inputs_embeds is not None:
                raise NotImplementedError("generate() with inputs_embeds is not supported for prefix tuning; "
                                          "pass input_ids")
            # The prefix is handed to generate() as an already-filled key/value cache.
            cache_arg = self._check_prefix_support()
            kwargs[cache_arg] = self.get_prompt(batch)
            if seq2seq:
                # the decoder continues from the cache; the encoder never sees the prefix
                return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            else:
                # decoder-only generate() expects the sequence to start with the tokens the cache
                # covers: placeholder ids stand in for the nvt prefix positions (never embedded, since
                # the cache has them) and are cut from the result.
                if attention_mask is None:
                    attention_mask = torch.ones_like(input_ids)
                fake = torch.zeros(batch, nvt, dtype=input_ids.dtype, device=input_ids.device)
                out = self.base_model.generate(input_ids=torch.cat([fake, input_ids], dim=1),
                                               attention_mask=self._extend_mask(attention_mask, nvt, batch),
                                               **kwargs)
            return self._cut_generate_output(out, nvt)
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        prompts = self.get_prompt(batch).to(inputs_embeds.dtype)
        if seq2seq:
            prompts = prompts[:, :nvt]
        out = self.base_model.generate(inputs_embeds=torch.cat([prompts, inputs_embeds], dim=1),
                                       attention_mask=self._extend_mask(attention_mask, nvt, batch), **kwargs)
        if seq2seq or input_ids is None:
            return out
        # decoder-only generate() from embeddings returns only the new tokens; peft returns the
        # prompt's ids followed by them, as generate() from input_ids does
        return self._prepend_generate_output(out, input_ids)

    def _shift_max_length(self, kwargs: dict, nvt: int) -> None:
        # generate() counts the nvt virtual (or placeholder) positions in max_length; shift it so that
        # max_length keeps meaning the length of the returned sequence (input ids + new tokens)
        if kwargs.get("max_new_tokens") is not None:
            return
        gen_config = kwargs.get("generation_config") or getattr(self.base_model, "generation_config", None)
        if gen_config is not None and gen_config.max_new_tokens is not None and "max_length" not in kwargs:
            return
        max_length = kwargs.get("max_length", getattr(gen_config, "max_length", None))
        if max_length is not None:
            kwargs["max_length"] = max_length + nvt

    @staticmethod
    def _cut_generate_output(out, n: int):
        if isinstance(out, torch.Tensor):
            return out[:, n:]
        out.sequences = out.sequences[:, n:]
        return out

    @staticmethod
    def _prepend_generate_output(out, input_ids):
        if isinstance(out, torch.Tensor):
            return torch.cat([input_ids.to(out.device), out], dim=1)
        out.sequences = torch.cat([input_ids.to(out.sequences.device), out.sequences], dim=1)
        return out
