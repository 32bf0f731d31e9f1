"""fastpeft config classes vs. peft 0.21.2: fields, defaults, checks, and adapter_config.json both ways."""
import dataclasses
import importlib.util
import json
import os
import warnings

import peft  # the reference implementation (a test dependency): fields, files and checks are compared to it
import pytest
from packaging.version import Version

import fastpeft.config as fconfig
from fastpeft.config import (
    CONFIG_NAME,
    PEFT_TYPE_TO_CONFIG_MAPPING,
    AdapterConfigNotFoundError,
    PeftConfig,
    get_peft_config_class,
    register_peft_config,
)
from fastpeft.tuners.lora.config import LoraConfig, LoraRuntimeConfig
from fastpeft.utils.peft_types import PeftType, TaskType



def _defaults(cls):
    out = {}
    for f in dataclasses.fields(cls):
        out[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return out


def _write(folder, data):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG_NAME), "w") as fh:
        json.dump(data, fh)


def _lora_dict(**overrides):
    d = json.loads(json.dumps(dict(LoraConfig().to_dict(), peft_type="LORA")))
    d.update(overrides)
    return d


# ---------------------------------------------------------------------------------------------- enums
@pytest.mark.parametrize("ours,theirs", [(PeftType, "PeftType"), (TaskType, "TaskType")])
def test_enums_match_peft(ours, theirs):
    theirs = getattr(peft, theirs)
    assert [(m.name, m.value) for m in ours] == [(m.name, m.value) for m in theirs]
    assert issubclass(ours, str)
    first = next(iter(ours))
    assert first == first.value and hash(first) == hash(first.value)  # usable as the plain JSON string


# ---------------------------------------------------------------------------------- fields / defaults
@pytest.mark.parametrize("ours,theirs", [(PeftConfig, "PeftConfig"), (LoraConfig, "LoraConfig")])
def test_field_names_and_defaults_match_peft(ours, theirs):
    theirs = getattr(peft, theirs)
    mine, ref = _defaults(ours), _defaults(theirs)
    assert set(mine) == set(ref)
    assert len(mine) == (42 if ours is LoraConfig else 7)
    for name in ref:
        if name == "runtime_config":
            assert dataclasses.asdict(mine[name]) == dataclasses.asdict(ref[name])
        else:
            assert mine[name] == ref[name] and type(mine[name]) is type(ref[name]), name


def test_every_field_has_its_own_help_text():
    helps = [f.metadata.get("help") for f in dataclasses.fields(LoraConfig)]
    assert all(isinstance(h, str) and h for h in helps)
    assert len(set(helps)) == len(helps)


def test_post_init_normalisation_matches_peft():
    kw = dict(target_modules=["q", "v"], exclude_modules=["k"], task_type="CAUSAL_LM")
    ours, ref = LoraConfig(**kw), peft.LoraConfig(**kw)
    assert ours.target_modules == ref.target_modules == {"q", "v"}
    assert ours.exclude_modules == {"k"} and isinstance(ours.exclude_modules, set)
    assert ours.peft_type is PeftType.LORA and ours.peft_type == ref.peft_type
    assert LoraConfig(target_modules=".*proj").target_modules == ".*proj"
    assert LoraConfig(peft_type="IA3").peft_type is PeftType.LORA
    assert LoraConfig(runtime_config={"ephemeral_gpu_offload": True}).runtime_config.ephemeral_gpu_offload


# Constructor arguments that peft rejects; fastpeft must reject them with the same exception type.
INVALID = [
    dict(task_type="FOO"),
    dict(target_modules="q.*", layers_to_transform=[0]),
    dict(target_modules="q.*", layers_pattern="layers"),
    dict(layers_pattern="layers"),
    dict(target_parameters="weight"),
    dict(use_dora=True, megatron_config={"a": 1}),
    dict(lora_bias=True, use_dora=True),
    dict(lora_bias=True, init_lora_weights="gaussian"),
    dict(kasa_config=5),
    dict(use_bdlora=True),
]


@pytest.mark.parametrize("kwargs", INVALID, ids=lambda k: ",".join(k))
def test_invalid_combinations_raise_like_peft(kwargs):
    with pytest.raises(Exception) as ref:
        peft.LoraConfig(**kwargs)
    with pytest.raises(type(ref.value)):
        LoraConfig(**kwargs)


def test_loftq_checks():
    with pytest.raises(ValueError, match="loftq_config"):
        LoraConfig(init_lora_weights="loftq")
    cfg = LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 4})
    assert cfg.loftq_config == {"loftq_bits": 4}
    with pytest.warns(UserWarning, match="loftq_config"):
        cfg = LoraConfig(loftq_config={"loftq_bits": 4})
    assert cfg.loftq_config == {}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(eva_config={"rho": 2.0}), "eva_config"),
        (dict(corda_config={"cache_file": None}), "corda_config"),
        (dict(alora_invocation_tokens=[1, 2]), "CAUSAL_LM"),
        (dict(use_rslora=True, rank_pattern={"q": 2}, init_lora_weights="pissa"), "rank_pattern"),
    ],
)
def test_warnings_where_peft_warns(kwargs, match):
    with warnings.catch_warnings(record=True) as ref:
        warnings.simplefilter("always")
        peft.LoraConfig(**kwargs)
    assert ref, "peft no longer warns here; re-check the mirrored behaviour"
    with pytest.warns(UserWarning, match=match):
        LoraConfig(**kwargs)


def test_no_warning_for_plain_config():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoraConfig(target_modules=["q"], alora_invocation_tokens=[1], task_type=TaskType.CAUSAL_LM)


# ------------------------------------------------------------------------------------ round trip
# One non-default value per field (plus what that value needs to be valid).
NON_DEFAULT = {
    "task_type": dict(task_type="SEQ_CLS"),
    "peft_type": dict(peft_type="LORA"),
    "auto_mapping": dict(auto_mapping={"base_model_class": "MyModel", "parent_library": "my.lib"}),
    "peft_version": dict(peft_version="0.19.0"),
    "base_model_name_or_path": dict(base_model_name_or_path="org/base"),
    "revision": dict(revision="v1"),
    "inference_mode": dict(inference_mode=True),
    "r": dict(r=4),
    "target_modules": dict(target_modules=["q_proj", "v_proj"]),
    "exclude_modules": dict(exclude_modules=["lm_head"]),
    "lora_alpha": dict(lora_alpha=32),
    "lora_dropout": dict(lora_dropout=0.05),
    "fan_in_fan_out": dict(fan_in_fan_out=True),
    "bias": dict(bias="lora_only"),
    "use_rslora": dict(use_rslora=True),
    "modules_to_save": dict(modules_to_save=["score"]),
    "init_lora_weights": dict(init_lora_weights="gaussian"),
    "layers_to_transform": dict(layers_to_transform=[0, 2]),
    "layers_pattern": dict(layers_pattern="layers", layers_to_transform=1),
    "rank_pattern": dict(rank_pattern={"q_proj": 2}),
    "alpha_pattern": dict(alpha_pattern={"v_proj": 3}),
    "megatron_config": dict(megatron_config={"tensor_model_parallel_size": 2}),
    "megatron_core": dict(megatron_core="my.megatron"),
    "trainable_token_indices": dict(trainable_token_indices={"embed_tokens": [1, 5]}),
    "loftq_config": dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1}),
    "eva_config": dict(init_lora_weights="eva", eva_config={"rho": 1.5, "tau": 0.9}),
    "corda_config": dict(init_lora_weights="corda", corda_config={"corda_method": "kpm"}),
    "lora_ga_config": dict(lora_ga_config={"stable_gamma": 8}),
    "use_dora": dict(use_dora=True),
    "velora_config": dict(velora_config={"num_groups": 8}),
    "alora_invocation_tokens": dict(alora_invocation_tokens=[7, 8], task_type="CAUSAL_LM"),
    "use_qalora": dict(use_qalora=True),
    "qalora_group_size": dict(qalora_group_size=32),
    "monteclora_config": dict(monteclora_config={"num_samples": 4}),
    "layer_replication": dict(layer_replication=[[0, 2], [1, 3]]),
    "runtime_config": None,  # never saved; see test_runtime_config_is_not_saved
    "lora_bias": dict(lora_bias=True),
    "target_parameters": dict(target_parameters=["experts.gate_up_proj"]),
    "use_bdlora": dict(use_bdlora={"nblocks": 2}),
    "arrow_config": dict(arrow_config={"top_k": 2}),
    "kasa_config": dict(kasa_config={"beta": 0.1}),
    "ensure_weight_tying": dict(ensure_weight_tying=True),
}


NESTED = {"loftq_config", "eva_config", "corda_config", "lora_ga_config", "velora_config", "monteclora_config",
          "use_bdlora", "arrow_config", "kasa_config"}


def test_non_default_table_covers_every_field():
    assert set(NON_DEFAULT) == {f.name for f in dataclasses.fields(LoraConfig)}


@pytest.mark.parametrize("name", [n for n, v in NON_DEFAULT.items() if v is not None])
def test_round_trip_each_field(name, tmp_path):
    cfg = LoraConfig(**NON_DEFAULT[name])
    if name != "peft_type":
        assert getattr(cfg, name) != _defaults(LoraConfig)[name]
    cfg.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean file must load without any warning
        loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is LoraConfig
    assert loaded == cfg
    assert loaded.to_dict() == cfg.to_dict()
    if name == "loftq_config" and importlib.util.find_spec("scipy") is None:
        return  # peft itself refuses init_lora_weights="loftq" without scipy; nothing to compare against
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = peft.PeftConfig.from_pretrained(str(tmp_path))
    ours, theirs = cfg.to_dict()[name], ref.to_dict()[name]
    if name in NESTED:  # peft fills in the sub-config's other defaults
        assert ours == {k: theirs[k] for k in ours}
    else:
        assert ours == theirs


def test_round_trip_many_fields_at_once(tmp_path):
    kw = {}
    for name in ["task_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "r",
                 "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias",
                 "use_rslora", "modules_to_save", "layers_pattern", "rank_pattern", "alpha_pattern", "lora_bias"]:
        kw.update(NON_DEFAULT[name])
    cfg = LoraConfig(**kw)
    cfg.save_pretrained(tmp_path)
    assert LoraConfig.from_pretrained(tmp_path) == cfg


def test_saved_json_format(tmp_path):
    LoraConfig(target_modules=["v", "q", "k"], task_type=TaskType.CAUSAL_LM).save_pretrained(tmp_path)
    text = (tmp_path / CONFIG_NAME).read_text()
    data = json.loads(text)
    assert data["target_modules"] == ["k", "q", "v"]  # a set, written as a sorted list
    assert data["peft_type"] == "LORA" and data["task_type"] == "CAUSAL_LM"
    assert "runtime_config" not in data
    assert list(data) == sorted(data) and text.startswith('{\n  "')
    assert [p.name for p in tmp_path.iterdir()] == [CONFIG_NAME]  # no temporary file left behind


def test_runtime_config_is_not_saved(tmp_path):
    cfg = LoraConfig(runtime_config=LoraRuntimeConfig(ephemeral_gpu_offload=True))
    assert "runtime_config" not in cfg.to_dict()
    cfg.save_pretrained(tmp_path)
    assert LoraConfig.from_pretrained(tmp_path).runtime_config == LoraRuntimeConfig()
    _write(tmp_path / "b", _lora_dict(runtime_config={"ephemeral_gpu_offload": True}))
    with pytest.warns(UserWarning, match="runtime_config"):
        assert not PeftConfig.from_pretrained(tmp_path / "b").runtime_config.ephemeral_gpu_offload


def test_nested_config_objects_are_written_as_dicts(tmp_path):
    from peft.tuners.lora.config import EvaConfig

    cfg = LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(rho=1.5))
    assert cfg.eva_config == EvaConfig(rho=1.5)  # kept as given
    assert cfg.to_dict()["eva_config"] == dataclasses.asdict(EvaConfig(rho=1.5))
    cfg.save_pretrained(tmp_path)
    assert LoraConfig.from_pretrained(tmp_path).to_dict() == cfg.to_dict()


def test_save_is_atomic(tmp_path, monkeypatch):
    LoraConfig(r=4).save_pretrained(tmp_path)
    before = (tmp_path / CONFIG_NAME).read_text()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fconfig.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        LoraConfig(r=16).save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == [CONFIG_NAME]


def test_save_into_a_file_path_fails(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="f"):
        LoraConfig().save_pretrained(tmp_path / "f")


def test_auto_mapping_dict_kwarg(tmp_path):
    LoraConfig().save_pretrained(tmp_path, auto_mapping_dict={"base_model_class": "M", "parent_library": "x"})
    assert LoraConfig.from_pretrained(tmp_path).auto_mapping == {"base_model_class": "M", "parent_library": "x"}


# ------------------------------------------------------------------------------ peft <-> fastpeft
CROSS = dict(
    task_type="CAUSAL_LM", base_model_name_or_path="org/base", r=4, lora_alpha=16, lora_dropout=0.1,
    target_modules=["q_proj", "v_proj"], exclude_modules=["lm_head"], bias="lora_only", use_rslora=True,
    modules_to_save=["score"], layers_to_transform=[0, 1], layers_pattern="layers", rank_pattern={"q_proj": 8},
    alpha_pattern={"v_proj": 2}, init_lora_weights="gaussian", megatron_core="x.core", qalora_group_size=8,
    alora_invocation_tokens=[3, 4], layer_replication=[[0, 1], [0, 2]], trainable_token_indices=[1, 2],
)


def test_peft_saved_config_loads_in_fastpeft(tmp_path):
    from peft.tuners.lora.config import CordaConfig

    ref = peft.LoraConfig(**CROSS)
    ref.save_pretrained(tmp_path / "a")
    ref2 = peft.LoraConfig(init_lora_weights="corda", corda_config=CordaConfig(corda_method="kpm"), lora_bias=False)
    ref2.save_pretrained(tmp_path / "b")
    for folder, cfg in [(tmp_path / "a", ref), (tmp_path / "b", ref2)]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours = PeftConfig.from_pretrained(folder)
        assert type(ours) is LoraConfig
        assert ours.to_dict() == cfg.to_dict()
        assert ours.peft_version == peft.__version__


def test_fastpeft_saved_config_loads_in_peft(tmp_path):
    ours = LoraConfig(**CROSS)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert type(ref) is peft.LoraConfig
    assert ref.to_dict() == ours.to_dict()


def test_peft_version_written():
    version = LoraConfig().peft_version
    from fastpeft import __version__

    assert version == f"{fconfig.PEFT_FORMAT_VERSION}+fastpeft.{__version__}"
    assert Version(version.partition("@")[0]).release == Version(peft.__version__).release
    assert LoraConfig(peft_version="0.17.0").peft_version == "0.17.0"


# ------------------------------------------------------------------------------ loading errors
def test_unknown_keys_warn_once_and_load(tmp_path):
    _write(tmp_path, _lora_dict(r=4, brand_new_option=1, another_one={"x": 1}))
    with pytest.warns(UserWarning) as rec:
        cfg = PeftConfig.from_pretrained(tmp_path)
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 1 and "brand_new_option" in msgs[0] and "another_one" in msgs[0]
    assert CONFIG_NAME in msgs[0]
    assert cfg.r == 4 and not hasattr(cfg, "brand_new_option")


def test_missing_config_names_the_folder(tmp_path):
    with pytest.raises(AdapterConfigNotFoundError) as exc:
        PeftConfig.from_pretrained(tmp_path)
    assert str(tmp_path) in str(exc.value)
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, FileNotFoundError)


def test_missing_local_path_names_it_without_network(tmp_path, monkeypatch):
    def fake_download(repo_id, filename, **kw):
        raise ValueError(f"Repo id must be in the form 'namespace/repo_name': {repo_id!r}")

    monkeypatch.setattr(fconfig, "hf_hub_download", fake_download)
    missing = tmp_path / "does" / "not" / "exist"
    with pytest.raises(AdapterConfigNotFoundError) as exc:
        PeftConfig.from_pretrained(missing)
    assert str(missing / CONFIG_NAME) in str(exc.value) and "Repo id" in str(exc.value)


def test_unserialisable_value_names_the_field(tmp_path):
    cfg = LoraConfig(megatron_config={"dtype": object()})
    with pytest.raises(TypeError, match="megatron_config"):
        cfg.save_pretrained(tmp_path)
    assert not list(tmp_path.iterdir())


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / CONFIG_NAME).write_text('{"peft_type": "LORA",')
    with pytest.raises(ValueError, match=str(tmp_path / CONFIG_NAME)):
        PeftConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        PeftConfig.from_pretrained(tmp_path)


def test_from_json_file_returns_dict_and_names_missing_path(tmp_path):
    _write(tmp_path, _lora_dict(r=3))
    assert PeftConfig.from_json_file(tmp_path / CONFIG_NAME)["r"] == 3
    with pytest.raises(FileNotFoundError, match="nope.json"):
        PeftConfig.from_json_file(tmp_path / "nope.json")


def test_subfolder(tmp_path):
    LoraConfig(r=5).save_pretrained(tmp_path / "adapters" / "sub")
    assert PeftConfig.from_pretrained(tmp_path / "adapters", subfolder="sub").r == 5
    with pytest.raises(AdapterConfigNotFoundError, match="other"):
        PeftConfig.from_pretrained(tmp_path / "adapters", subfolder="other")


def test_hub_id(tmp_path, monkeypatch):
    LoraConfig(r=6).save_pretrained(tmp_path / "cache")
    calls = []

    def fake_download(repo_id, filename, subfolder=None, revision=None, token=None, **kw):
        calls.append((repo_id, filename, subfolder, revision, token))
        if repo_id != "org/adapter":
            raise RuntimeError("404 repository not found")
        return str(tmp_path / "cache" / CONFIG_NAME)

    monkeypatch.setattr(fconfig, "hf_hub_download", fake_download)
    cfg = PeftConfig.from_pretrained("org/adapter", subfolder="s", revision="main", token="t", r=99, device_map="x")
    assert type(cfg) is LoraConfig and cfg.r == 6  # the file wins over field kwargs, like peft
    assert calls == [("org/adapter", CONFIG_NAME, "s", "main", "t")]
    assert PeftConfig._get_peft_type("org/adapter") == "LORA"
    with pytest.raises(AdapterConfigNotFoundError, match="org/missing") as exc:
        PeftConfig.from_pretrained("org/missing", revision="v2")
    assert "404" in str(exc.value) and "v2" in str(exc.value)


# ---------------------------------------------------------------------------------- dispatch
def test_dispatch_errors(tmp_path):
    _write(tmp_path / "p", {"peft_type": "LOHA", "r": 8})
    with pytest.raises(NotImplementedError, match="LOHA"):
        PeftConfig.from_pretrained(tmp_path / "p")
    _write(tmp_path / "b", {"peft_type": "BOGUS"})
    with pytest.raises(ValueError, match="BOGUS"):
        PeftConfig.from_pretrained(tmp_path / "b")
    _write(tmp_path / "i", {"peft_type": "IA3"})
    with pytest.raises(ValueError, match="IA3"):
        LoraConfig.from_pretrained(tmp_path / "i")


def test_registry():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LORA] is LoraConfig
    assert PEFT_TYPE_TO_CONFIG_MAPPING["LORA"] is LoraConfig and get_peft_config_class("LORA") is LoraConfig
    register_peft_config("LORA", LoraConfig)  # idempotent

    @dataclasses.dataclass
    class Other(PeftConfig):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_peft_config(PeftType.LORA, Other)
    with pytest.raises(TypeError):
        register_peft_config("IA3", dict)
    assert PeftType.IA3 not in PEFT_TYPE_TO_CONFIG_MAPPING


def test_from_dict_and_from_peft_type():
    cfg = PeftConfig.from_dict({"peft_type": "LORA", "r": 2, "target_modules": ["a"]})
    assert type(cfg) is LoraConfig and cfg.r == 2 and cfg.target_modules == {"a"}
    assert PeftConfig.from_peft_type(peft_type="LORA", r=3).r == 3
    assert type(LoraConfig.from_dict({"r": 2})) is LoraConfig
    assert PeftConfig.from_dict(LoraConfig(r=7).to_dict()) == LoraConfig(r=7)


# ---------------------------------------------------------------------------- unsupported_fields
@pytest.mark.parametrize(
    "name",
    ["velora_config", "megatron_config",
     "layer_replication",  # loftq_config, alora_invocation_tokens, use_qalora: tests/tuners/test_lora_config_variants.py
     # eva_config, corda_config, lora_ga_config and their inits: tests/tuners/test_lora_inits.py
     # use_bdlora: tests/tuners/test_lora_bdlora.py
     "arrow_config", "kasa_config", "monteclora_config"],
)
def test_unsupported_fields_each(name):
    expected = [name] + (["init_lora_weights"] if name == "loftq_config" else [])
    assert sorted(LoraConfig(**NON_DEFAULT[name]).unsupported_fields()) == sorted(expected)


@pytest.mark.parametrize("init", ["loftq_x", "pisa", "Eva", "gaussian_"])
def test_unsupported_init(init):
    assert LoraConfig(init_lora_weights=init).unsupported_fields() == ["init_lora_weights"]


def test_supported_configs_report_nothing():
    for init in (True, False, "gaussian"):
        assert LoraConfig(init_lora_weights=init).unsupported_fields() == []
    supported = [n for n in ("r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
                             "bias", "use_rslora", "modules_to_save", "layers_pattern", "rank_pattern",
                             "alpha_pattern", "lora_bias", "task_type", "inference_mode", "qalora_group_size",
                             "trainable_token_indices", "ensure_weight_tying", "target_parameters")]
    kw = {}
    for n in supported:
        kw.update(NON_DEFAULT[n])
    assert LoraConfig(**kw).unsupported_fields() == []
    assert LoraConfig(**NON_DEFAULT["use_dora"]).unsupported_fields() == []  # (DoRA refuses lora_bias, as peft)
    assert LoraConfig(init_lora_weights=1).unsupported_fields() == ["init_lora_weights"]
