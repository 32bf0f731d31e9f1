"""docs/serving.md's example, read from the file and run: every generated row equals its adapter's own greedy
generation (fastpeft's PeftModel with that adapter alone, or the base model), through the mid-stream load."""
from __future__ import annotations

import copy
import os
import re
import warnings

import torch

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "serving.md")


def test_serving_doc_example_runs_and_each_row_is_its_adapter_alone(capsys):
    import fastpeft

    code = re.search(r"```python\n(.*?)```", open(DOC).read(), re.S).group(1)
    ns: dict = {"__name__": "serving_doc"}
    exec(compile(code, DOC, "exec"), ns)
    bank, root = ns["bank"], ns["root"]
    assert list(bank.loaded()) == ["carol", "bob", "dave"] and bank.stats["evictions"] == 1
    assert "AdapterBank(6 layers, 3/3 slots loaded" in capsys.readouterr().out
    base = bank.uninstall()

    def own(name, prompt):
        if name == "__base__":
            model = base
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(root, name)).eval()
        with torch.no_grad():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                  do_sample=False)[:, prompt.shape[1]:]

    prompts = ns["prompts"]
    for i, name in enumerate(ns["names"]):
        assert torch.equal(ns["generated"][i:i + 1], own(name, prompts[i:i + 1])), name
    for i, name in enumerate(ns["running"]):
        assert torch.equal(ns["decoded"][i:i + 1], own(name, prompts[i:i + 1])), name
