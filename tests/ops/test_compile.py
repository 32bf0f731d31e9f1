"""torch.compile(fullgraph=True) traces lora_linear (custom ops + fake impls) and fastpeft LoRA models with
no graph break.

Default run: the op on a small module (aot_eager, with and without dropout), dynamo's explain, and a
fastpeft PeftModel (LoRA Linear + Embedding layers, dropout on) compiled with fullgraph=True. `slow`: the
same on a tiny transformers Llama, and the inductor backend (C++ codegen, ~45 s cold on 2 cores).
"""
from __future__ import annotations

import pytest
import torch

from fastpeft.ops import lora_linear
from _support.models import Plain, ids_for, tiny_inputs, tiny_model


class _Tiny(torch.nn.Module):
    def __init__(self, p):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.W = torch.nn.Parameter(torch.randn(16, 16, generator=g) / 4, requires_grad=False)
        self.b = torch.nn.Parameter(torch.randn(16, generator=g))
        self.A = torch.nn.Parameter(torch.randn(4, 16, generator=g) / 4)
        self.B = torch.nn.Parameter(torch.randn(16, 4, generator=g) / 2)
        self.p = p

    def forward(self, x):
        h = lora_linear(x, self.W, self.b, self.A, self.B, 0.5, self.p, self.training)
        return lora_linear(torch.relu(h), self.W, None, self.A, self.B, 0.5, self.p, self.training)


def _grads(m, x, fn):
    for t in (x, *m.parameters()):
        t.grad = None
    torch.manual_seed(0)
    y = fn(x)
    y.square().sum().backward()
    return [y.detach()] + [t.grad.clone() for t in (x, m.b, m.A, m.B)]


def _compare(backend, p):
    torch._dynamo.reset()
    m = _Tiny(p).train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    eager = _grads(m, x, m)
    compiled = _grads(m, x, torch.compile(m, fullgraph=True, backend=backend))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_compile_aot_eager_fullgraph_matches_eager(p):
    # aot_eager runs the traced graph's randint on the default CPU generator like eager does, so even
    # with dropout the compiled step must reproduce eager bit for bit (same seeds, same masks).
    _compare("aot_eager", p)


def test_dynamo_explain_no_graph_break():
    m = _Tiny(0.1).train()
    explanation = torch._dynamo.explain(m)(torch.randn(3, 16))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_compile_inductor_fullgraph_matches_eager():
    # ~45 s on 2 cores (C++ codegen). Without dropout only: inductor replaces the seed's randint by its
    # own RNG stream, so dropout masks (though consistent between its forward and backward) differ
    # from eager's.
    _compare("inductor", 0.0)


def test_compile_frozen_adapters_grad_to_x_only():
    # A frozen adapter (inference-mode LoRA, or a disabled one) with a trainable input: backward is
    # asked for dX only, so the op returns empty dA and dB, which must be distinct tensors (a custom
    # op may not return one tensor twice; this used to fail under torch.compile).
    torch._dynamo.reset()
    m = _Tiny(0.0).train()
    m.A.requires_grad_(False)
    m.B.requires_grad_(False)
    m.b.requires_grad_(False)
    x = torch.randn(3, 16, requires_grad=True)
    m(x).sum().backward()
    expected = x.grad.clone()
    x.grad = None
    torch.compile(m, fullgraph=True, backend="aot_eager")(x).sum().backward()
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)


def _peft_model_step(model, forward, seed=0):
    """Output and LoRA grads of one training step (seeded: the same dropout masks each time)."""
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    y = forward(model)
    y.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return y.detach(), grads


def _compile_peft_model(base, forward, **cfg):
    import fastpeft

    torch._dynamo.reset()
    model = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **cfg))
    model.train()
    y, grads = _peft_model_step(model, forward)
    # fullgraph=True: any graph break inside the model raises instead of silently splitting the graph
    y_c, grads_c = _peft_model_step(model, torch.compile(forward, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(y_c, y, rtol=1e-5, atol=1e-5)
    assert grads_c.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], rtol=1e-5, atol=1e-5, msg=n)
    return model


def test_compile_fastpeft_lora_model_fullgraph():
    """A fastpeft PeftModel (LoRA Linear and Embedding layers, lora_dropout on) traces as one graph and
    its compiled training step (forward + backward) matches eager."""
    from fastpeft.tuners.lora import Embedding, Linear

    ids = ids_for()
    model = _compile_peft_model(Plain(), lambda m: m(ids), lora_dropout=0.2,
                                target_modules=["emb", "layers.0.0", "layers.1.2", "head"])
    kinds = {type(m) for m in model.modules()}
    assert Linear in kinds and Embedding in kinds


@pytest.mark.slow
def test_compile_fastpeft_lora_llama_fullgraph():
    # ~10 s on 2 cores: a whole transformers decoder under dynamo
    ids = tiny_inputs("llama")["input_ids"]
    _compile_peft_model(tiny_model("llama"), lambda m: m(input_ids=ids).logits, lora_dropout=0.1,
                        target_modules="all-linear")


def test_compile_several_adapters_and_a_packed_base_in_one_call():
    """ops.lora with two adapters (each its own dropout) over a dense and over an nf4 base: fullgraph
    traces the one call, and forward + grads equal eager's (aot_eager replays the same seeds)."""
    from fastpeft import ops
    from fastpeft.quant.formats import quantize_weight

    g = torch.Generator().manual_seed(3)
    W = torch.randn(12, 16, generator=g) / 4
    qw = quantize_weight(W, "nf4", blocksize=64)
    leaves = [torch.randn(4, 16, generator=g).requires_grad_(), torch.randn(12, 4, generator=g).requires_grad_(),
              torch.randn(2, 16, generator=g).requires_grad_(), torch.randn(12, 2, generator=g).requires_grad_()]

    def f(x):
        adapters = [ops.Adapter(leaves[0], leaves[1], 0.5, 0.2), ops.Adapter(leaves[2], leaves[3], 2.0, 0.1)]
        y = ops.lora(x, ops.Base.dense(W), adapters, training=True)
        return ops.lora(torch.tanh(y).repeat(1, 1, 2)[..., :16], ops.Base.quantized(qw), adapters, training=True)

    def step(fn):
        for t in leaves:
            t.grad = None
        x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(0)
        y = fn(x)
        y.square().sum().backward()
        return [y.detach(), x.grad] + [t.grad.clone() for t in leaves]

    torch._dynamo.reset()
    eager = step(f)
    compiled = step(torch.compile(f, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
