"""Triton kernels of fastpeft, installed as `fastpeft.kernels`.

Kernels know nothing of models: each file holds one op's Triton kernels and launcher.
Layers never import this package; they go through `fastpeft.ops`.
"""
