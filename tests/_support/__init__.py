"""Shared test support (no tests here). Import as ``_support.<module>``: the root tests/conftest.py puts
tests/ on sys.path.

- ``_support.reference``: the float64 reference of the LoRA linear, its grads, the one error measure
  (``rel_err``: NaN/inf never passes) and the one tolerance table (``TOL``);
- ``_support.models``: tiny transformers models (OPT, Llama, GPT-2, RoBERTa, BERT, T5, ...) with
  seeded random weights, their inputs, and a plain nn.Module;
- ``_support.twins``: the same model wrapped by fastpeft and by HF peft with the same config and
  weights, and the comparisons of the two.

None of these modules imports fastpeft, transformers or peft at import time (the Triton interpreter
flag must be set before fastpeft.kernels is imported, and collecting the kernel tests stays fast).
"""
