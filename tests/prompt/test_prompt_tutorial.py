"""peft's p-tuning tutorial as README.md shows it ("P-tuning quick start"): the code block is read from
README.md and run.

Default run: the README code with the model shrunk by text substitution (a 2-layer, hidden-32
RoBERTa; every substitution must hit, so an edit of the README that this test no longer follows fails
here). `slow` (--runslow or FASTPEFT_SLOW=1): the README code unchanged, RoBERTa-large's shape (355M
random weights, about 30 s on two CPU cores), printing the numbers the README shows.
Both runs check what the README claims: the training steps move every trainable tensor, the saved
adapter reloads to the same logits (the README's own assert), the trainable-parameter line.
"""
import os
import re

import pytest
import torch

import fastpeft

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")

# README value -> tiny value; each must occur in the README code block.
SMALL = [
    (r"\bvocab_size=50265\b", "vocab_size=64"),
    (r"\btorch\.randint\(3, 50265,", "torch.randint(3, 64,"),
    (r"\bhidden_size=1024\b", "hidden_size=32"),
    (r"\bnum_hidden_layers=24\b", "num_hidden_layers=2"),
    (r"\bnum_attention_heads=16\b", "num_attention_heads=4"),
    (r"\bintermediate_size=4096\b", "intermediate_size=64"),
    (r"\bmax_position_embeddings=514\b", "max_position_embeddings=72"),
    (r"\bencoder_hidden_size=128\b", "encoder_hidden_size=16"),
    (r"\bnum_layers=24\b", "num_layers=2"),
    (r"\btoken_dim=1024\b", "token_dim=32"),
]


def _readme_example() -> str:
    text = open(README, encoding="utf-8").read()
    section = text.split("## P-tuning quick start", 1)[1]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "README: no python block under 'P-tuning quick start'"
    code = m.group(1)
    assert "get_peft_model(base, peft_config)" in code and "PeftModel.from_pretrained" in code
    return code


def _run(code, tmp_path, monkeypatch, capsys):
    """exec the tutorial in tmp_path; returns (namespace, printed text, trainable tensors at the start)."""
    monkeypatch.chdir(tmp_path)
    start = {}
    real = fastpeft.get_peft_model

    def spy(*args, **kwargs):  # the README imports get_peft_model from fastpeft: snapshot the fresh adapter
        model = real(*args, **kwargs)
        start.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return model

    monkeypatch.setattr(fastpeft, "get_peft_model", spy)
    import transformers

    transformers.logging.set_verbosity_error()
    ns = {"__name__": "readme_ptuning"}
    exec(compile(code, README, "exec"), ns)  # includes the README's reload assert (torch.equal)
    printed = capsys.readouterr().out
    model = ns["model"]
    assert start, "get_peft_model was not called"
    moved = {n: not torch.equal(p, start[n]) for n, p in model.named_parameters() if p.requires_grad}
    assert moved.keys() == start.keys() and all(moved.values()), [n for n, v in moved.items() if not v]
    assert sorted(os.listdir(tmp_path / "roberta-ptuning")) == ["README.md", "adapter_config.json",
                                                                "adapter_model.safetensors"]
    return ns, printed, start


def test_readme_tutorial_small(tmp_path, monkeypatch, capsys):
    code = _readme_example()
    for pattern, small in SMALL:
        code, n = re.subn(pattern, small, code)
        assert n > 0, f"README p-tuning example no longer contains {pattern!r}"
    ns, printed, _ = _run(code, tmp_path, monkeypatch, capsys)
    # prompt table 20x32 + MLP (32->16->16->32) + classifier copy (32x32+32 + 32x2+2)
    trainable = 20 * 32 + (32 * 16 + 16) + (16 * 16 + 16) + (16 * 32 + 32) + (32 * 32 + 32) + (32 * 2 + 2)
    assert ns["model"].get_nb_trainable_parameters()[0] == trainable
    assert f"trainable params: {trainable:,} || all params: " in printed, printed


@pytest.mark.slow
def test_readme_tutorial_full_size(tmp_path, monkeypatch, capsys):
    code = _readme_example()
    claimed = re.search(r"# (trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: [\d.]+)", code)
    assert claimed, "README: the print_trainable_parameters line is missing"
    ns, printed, _ = _run(code, tmp_path, monkeypatch, capsys)
    assert claimed.group(1) in printed, (claimed.group(1), printed)
    # the numbers peft prints for this tutorial
    assert ns["model"].get_nb_trainable_parameters() == (1_351_938, 356_713_732)
