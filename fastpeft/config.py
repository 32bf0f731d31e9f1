"""Adapter configuration base classes and adapter_config.json I/O.

The JSON written here is the same format peft 0.21 writes and reads: the dataclass fields as keys
(sorted, indent 2), sets written as lists, enums as their string values, nested sub-configs as
plain dicts. A config file written by either library loads in the other.

`PeftConfig.from_pretrained` / `from_dict` pick the config class from the file's `peft_type` through
`PEFT_TYPE_TO_CONFIG_MAPPING`; adapter methods fastpeft does not implement yet fail with an error
that names the method, rather than loading into a class that cannot use them.
"""
from __future__ import annotations

import copy
import dataclasses
import enum
import importlib
import inspect
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from fastpeft.utils.atomic import write_json_atomic
from fastpeft.utils.peft_types import PeftType, TaskType

try:  # a hard dependency in practice (transformers needs it); kept optional so config I/O works offline without it
    from huggingface_hub import hf_hub_download
except ImportError:  # pragma: no cover - exercised only in stripped-down environments
    hf_hub_download = None

__all__ = [
    "CONFIG_NAME",
    "PEFT_FORMAT_VERSION",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "AdapterConfigNotFoundError",
    "PeftConfig",
    "PeftConfigMixin",
    "get_peft_config_class",
    "register_peft_config",
]

CONFIG_NAME = "adapter_config.json"

# The peft release whose adapter_config.json format fastpeft reads and writes.
PEFT_FORMAT_VERSION = "0.21.2"

# Keys a config dict must hold when they cannot be inferred from the class it is loaded with (peft's name).
MIN_EXPECTED_CONFIG_KEYS = ("peft_type",)


def _default_peft_version() -> str:
    """Value written into `peft_version` by configs created in fastpeft.

    peft 0.21 does not parse this field for LoRA, but it does parse it for some methods (OFT) with
    packaging.version after dropping an "@commit" suffix, so it must stay a valid PEP 440 version.
    A local version label keeps it valid, records the format version it is compatible with, and
    still says which library wrote the file: e.g. "0.21.2+fastpeft.0.1.0".
    """
    from fastpeft import __version__

    return f"{PEFT_FORMAT_VERSION}+fastpeft.{__version__}"


class AdapterConfigNotFoundError(FileNotFoundError, ValueError):
    """adapter_config.json was not found locally nor on the Hub.

    Also a ValueError because that is what peft raises in this case, so callers written for peft
    that catch ValueError keep working.
    """


# peft_type -> config class. Keys are PeftType members; since PeftType is a str enum, lookups with
# the plain strings read from JSON ("LORA") hit the same entries.
PEFT_TYPE_TO_CONFIG_MAPPING: dict[PeftType, type] = {}

# Modules that register a config class when imported. Looked up lazily so that
# `PeftConfig.from_pretrained` works even if the caller never imported the tuner package,
# without config.py importing every tuner (and torch) up front.
_CONFIG_MODULES: dict[PeftType, str] = {
    PeftType.LORA: "fastpeft.tuners.lora.config",
    PeftType.PROMPT_TUNING: "fastpeft.tuners.prompt.config",
    PeftType.P_TUNING: "fastpeft.tuners.prompt.config",
    PeftType.PREFIX_TUNING: "fastpeft.tuners.prompt.config",
}


def _as_peft_type(peft_type: Any) -> PeftType:
    try:
        return PeftType(peft_type)
    except ValueError:
        raise ValueError(
            f"Unknown peft_type {peft_type!r}; expected one of: {', '.join(p.value for p in PeftType)}."
        ) from None


def register_peft_config(peft_type: Union[str, PeftType], cls: type) -> type:
    """Make `cls` the config class for `peft_type` (used by from_pretrained / from_dict dispatch).

    Returns `cls`, so it can be used as `register_peft_config("LORA", LoraConfig)` right after the
    class definition. Registering a different class for an already registered type is an error:
    two tuners claiming the same peft_type is a bug, not something to resolve silently.
    """
    key = _as_peft_type(peft_type)
    if not (isinstance(cls, type) and issubclass(cls, PeftConfigMixin)):
        raise TypeError(f"register_peft_config({key.value!r}, ...): expected a PeftConfigMixin subclass, got {cls!r}")
    existing = PEFT_TYPE_TO_CONFIG_MAPPING.get(key)
    if existing is not None and existing is not cls:
        raise ValueError(
            f"peft_type {key.value!r} is already registered to {existing.__module__}.{existing.__qualname__}; "
            f"refusing to replace it with {cls.__module__}.{cls.__qualname__}"
        )
    PEFT_TYPE_TO_CONFIG_MAPPING[key] = cls
    cls._registered_peft_type = key
    return cls


def get_peft_config_class(peft_type: Union[str, PeftType]) -> type:
    """The fastpeft config class for `peft_type`.

    Raises ValueError for a value that is not a peft adapter type at all, and NotImplementedError
    (naming the type) for a real peft method that fastpeft does not implement yet.
    """
    key = _as_peft_type(peft_type)
    if key not in PEFT_TYPE_TO_CONFIG_MAPPING and key in _CONFIG_MODULES:
        importlib.import_module(_CONFIG_MODULES[key])
    if key not in PEFT_TYPE_TO_CONFIG_MAPPING:
        implemented = sorted(set(p.value for p in PEFT_TYPE_TO_CONFIG_MAPPING) | set(p.value for p in _CONFIG_MODULES))
        raise NotImplementedError(
            f"fastpeft does not implement peft_type {key.value!r} yet (implemented: {', '.join(implemented)}). "
            f"Load this adapter with Hugging Face peft instead."
        )
    return PEFT_TYPE_TO_CONFIG_MAPPING[key]


def _to_plain(value: Any) -> Any:
    """Deep copy of a field value with nested dataclasses turned into dicts (what peft's asdict does).

    Containers keep their type (a set stays a set; save_pretrained turns it into a list), so that
    `to_dict()` compares equal to peft's `to_dict()` for the same config.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return type(value)((_to_plain(k), _to_plain(v)) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return type(value)(_to_plain(v) for v in value)
    return copy.deepcopy(value)


def _to_json_value(value: Any) -> Any:
    """A to_dict() value in a form json.dumps writes the way peft does."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        # peft writes list(set) in arbitrary order; sorting makes our files reproducible (the order
        # carries no meaning, readers turn it back into a set).
        return sorted((_to_json_value(v) for v in value), key=lambda v: (type(v).__name__, repr(v)))
    if isinstance(value, (list, tuple)):
        return [_to_json_value(v) for v in value]
    if isinstance(value, dict):
        return {(k.value if isinstance(k, enum.Enum) else k): _to_json_value(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _to_json_value(_to_plain(value))
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return _to_json_value(value.to_dict())
    return value


def _hub_download_param_names() -> frozenset:
    if hf_hub_download is None:
        return frozenset()
    return frozenset(inspect.signature(hf_hub_download).parameters)


@dataclass
class PeftConfigMixin:
    """Fields every adapter config has, plus JSON (de)serialisation and class dispatch."""

    task_type: Optional[Union[str, TaskType]] = field(
        default=None, metadata={"help": "Which model head the adapter is for (a TaskType value), or None."}
    )
    peft_type: Optional[Union[str, PeftType]] = field(
        default=None, metadata={"help": "Adapter method; each config subclass fills it in itself."}
    )
    auto_mapping: Optional[dict] = field(
        default=None,
        metadata={"help": "For custom (non-transformers) base models: how to find the base model class again."},
    )
    peft_version: Optional[str] = field(
        default=None,
        metadata={"help": "Version stamp of the library that created the config; filled in automatically when None."},
    )

    # Fields that exist only while the program runs and are never written to adapter_config.json.
    _runtime_only_fields = ()

    def __post_init__(self):
        if self.task_type is not None and self.task_type not in [t.value for t in TaskType]:
            raise ValueError(
                f"Invalid task_type {self.task_type!r}; must be one of: {', '.join(t.value for t in TaskType)}."
            )
        if self.peft_version is None:
            self.peft_version = _default_peft_version()

    # --- properties peft's model code branches on -------------------------------------------------------
    @property
    def is_prompt_learning(self) -> bool:
        """True for prompt/prefix methods (virtual tokens instead of modified layers)."""
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        """True for the adaption-prompt (LLaMA-Adapter) method."""
        return False

    # --- dict conversion ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """All serialisable fields, in field order, deep-copied; nested dataclasses become dicts.

        Sets stay sets and enums stay enums (as in peft); save_pretrained converts them for JSON.
        """
        skip = set(self._runtime_only_fields)
        return {f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in skip}

    @classmethod
    def _resolve_class(cls, peft_type: Any) -> type:
        """The class that should be built for a dict with this peft_type when `cls` was asked to load it."""
        own = getattr(cls, "_registered_peft_type", None)
        if peft_type is None:
            return cls
        key = _as_peft_type(peft_type)
        if own is None:
            # a generic base class (PeftConfig): dispatch on the stored type
            return get_peft_config_class(key)
        if key != own:
            raise ValueError(
                f"{cls.__name__} cannot load a config whose peft_type is {key.value!r} (it holds {own.value!r} "
                f"configs); use PeftConfig.from_pretrained / PeftConfig.from_dict to load any adapter type."
            )
        return cls

    @classmethod
    def from_dict(cls, config_dict: dict, *, source: Optional[str] = None):
        """Build the config class named by config_dict["peft_type"] (or `cls` if absent).

        Keys that are not fields of that class (e.g. written by a newer peft) are reported in one
        warning and dropped, so newer files still load. `source` names the file in messages.
        """
        if not isinstance(config_dict, dict):
            raise TypeError(f"from_dict expects a dict, got {type(config_dict).__name__}")
        target = cls._resolve_class(config_dict.get("peft_type"))
        accepted = {f.name for f in dataclasses.fields(target) if f.init}
        unknown = sorted(k for k in config_dict if k not in accepted)
        if config_dict.get("peft_type") is None and (unknown or getattr(target, "_registered_peft_type", None) is None):
            # peft's refusal (same type and text): keys this class does not know and no peft_type to say which
            # class they belong to means the file is not a config of this class (e.g. {"foo": "bar"}, or a
            # LoRA config without peft_type read through PeftConfig). A generic class (PeftConfig) is refused
            # even without unknown keys: an untyped bare PeftConfig cannot build any adapter.
            where = f" (file: {source})" if source else ""
            raise TypeError(f"The {cls.__name__} config that is trying to be loaded is missing required keys: "
                            f"{set(MIN_EXPECTED_CONFIG_KEYS)}.{where}")
        if unknown:
            where = f" (file: {source})" if source else ""
            # the first sentence is peft's text word for word: callers filter this warning on it
            warnings.warn(
                f"Unexpected keyword arguments {unknown} for class {target.__name__}, these are ignored. This "
                f"probably means that you're loading a configuration file that was saved using a higher version of "
                f"the library and additional parameters have been introduced since.{where}",
                stacklevel=3,
            )
        kwargs = {k: v for k, v in config_dict.items() if k in accepted}
        try:
            return target(**kwargs)
        except (TypeError, ValueError) as exc:
            if source and hasattr(exc, "add_note"):
                exc.add_note(f"while loading {source}")
            raise

    @classmethod
    def from_peft_type(cls, **kwargs):
        """peft's name for from_dict: builds the class chosen by kwargs['peft_type']."""
        return cls.from_dict(kwargs)

    # --- files -------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write `<save_directory>/adapter_config.json` atomically.

        kwargs: `auto_mapping_dict` replaces the saved `auto_mapping` (peft's hook for custom
        models); any other kwargs (peft passes push-to-hub options here) are accepted and ignored.
        """
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise NotADirectoryError(f"save_pretrained: {save_directory!r} is a file; expected a directory")
        os.makedirs(save_directory, exist_ok=True)
        auto_mapping_dict = kwargs.pop("auto_mapping_dict", None)
        output = _to_json_value(self.to_dict())
        if auto_mapping_dict is not None:
            output["auto_mapping"] = _to_json_value(auto_mapping_dict)
        for key, value in output.items():
            # find the offending field here: json.dumps alone would not say which one it was
            try:
                json.dumps(value)
            except (TypeError, ValueError) as exc:
                raise TypeError(
                    f"{type(self).__name__}.save_pretrained: field {key!r} cannot be written to {CONFIG_NAME}: {exc}"
                ) from exc
        # atomic: a reader never sees a half-written config, and a failed save leaves the old one
        write_json_atomic(os.path.join(save_directory, CONFIG_NAME), output, indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs) -> dict:
        """Read an adapter_config.json and return its contents as a dict (like peft, not a config).

        A `runtime_config` key (never written by peft or fastpeft) is dropped with a warning.
        """
        path = os.fspath(path_json_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"adapter config file not found: {path!r}")
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path} must contain a JSON object, found {type(data).__name__}")
        if "runtime_config" in data:
            warnings.warn(f"{path}: ignoring 'runtime_config'; runtime options are not stored in config files.")
            del data["runtime_config"]
        return data

    @classmethod
    def _resolve_config_file(
        cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **hub_kwargs
    ) -> str:
        """Local path of adapter_config.json: from a local folder (+subfolder), else downloaded from the Hub."""
        base = os.fspath(pretrained_model_name_or_path)
        folder = os.path.join(base, subfolder) if subfolder else base
        local_file = os.path.join(folder, CONFIG_NAME)
        if os.path.isfile(local_file):
            return local_file
        if os.path.isdir(folder):
            # an existing local folder is what the user meant; do not fall back to the Hub
            raise AdapterConfigNotFoundError(f"No {CONFIG_NAME} in folder {folder!r} (looked for {local_file!r}).")
        if hf_hub_download is None:
            raise AdapterConfigNotFoundError(
                f"{CONFIG_NAME} not found: {local_file!r} does not exist and huggingface_hub is not installed "
                f"to look up {base!r} on the Hub."
            )
        try:
            return hf_hub_download(base, CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
        except Exception as exc:
            revision = hub_kwargs.get("revision")
            hub_where = f"Hub repo {base!r}" + (f" subfolder {subfolder!r}" if subfolder else "")
            hub_where += f" revision {revision!r}" if revision else ""
            raise AdapterConfigNotFoundError(
                f"{CONFIG_NAME} not found: no local file {local_file!r}, and downloading it from {hub_where} "
                f"failed: {type(exc).__name__}: {exc}"
            ) from exc

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        subfolder: Optional[str] = None,
        revision: Optional[str] = None,
        **kwargs,
    ):
        """Load adapter_config.json from a local folder or a Hub repo id, as the class its peft_type names.

        kwargs accepted by huggingface_hub.hf_hub_download (token, cache_dir, ...) are passed to it.
        Config field names given as kwargs only fill keys the file lacks (peft's behaviour: the file
        wins); set attributes on the returned config to change them. Other kwargs are ignored, since
        model loaders pass their own options through here.
        """
        hub_names = _hub_download_param_names()
        field_names = {f.name for f in dataclasses.fields(cls) if f.init}
        hub_kwargs = {k: v for k, v in kwargs.items() if k in hub_names and k not in ("repo_id", "filename", "subfolder")}
        if revision is not None:
            hub_kwargs["revision"] = revision
        class_kwargs = {k: v for k, v in kwargs.items() if k in field_names and k not in hub_names}
        config_file = cls._resolve_config_file(pretrained_model_name_or_path, subfolder, **hub_kwargs)
        loaded = cls.from_json_file(config_file)
        loaded = cls.check_kwargs(**{**class_kwargs, **loaded})
        return cls.from_dict(loaded, source=config_file)

    @classmethod
    def check_kwargs(cls, **kwargs) -> dict:
        """Hook for subclasses to validate or upgrade loaded keys before the config is built."""
        return kwargs

    @classmethod
    def _get_peft_type(cls, model_id: str, **hf_hub_download_kwargs) -> str:
        """The peft_type stored in a local folder's or Hub repo's adapter_config.json (as a string)."""
        subfolder = hf_hub_download_kwargs.pop("subfolder", None)
        config_file = cls._resolve_config_file(model_id, subfolder, **hf_hub_download_kwargs)
        loaded = cls.from_json_file(config_file)
        if "peft_type" not in loaded:
            raise ValueError(f"{config_file} has no 'peft_type' key")
        return loaded["peft_type"]


@dataclass
class PeftConfig(PeftConfigMixin):
    """Base class of the concrete adapter configs: adds what ties an adapter to its base model."""

    base_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Name or path of the base model the adapter was trained on."}
    )
    revision: Optional[str] = field(default=None, metadata={"help": "Hub revision of that base model."})
    inference_mode: bool = field(
        default=False, metadata={"help": "True: load the adapter frozen, for inference only."}
    )
