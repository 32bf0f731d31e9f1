"""QLoRA training step (forward + causal-LM loss + backward) of a Llama-style decoder whose linear
layers are quantized: fastpeft vs. peft + bitsandbytes vs. fastpeft over the 16-bit base.

Rows: `fastpeft_nf4` (fastpeft.quantize(model, "nf4") + fastpeft.get_peft_model: W dequantized in
registers inside the fused GEMMs on CUDA), `peft_bnb_nf4` (the same weights in bitsandbytes
Linear4bit nf4 layers + peft.get_peft_model; needs bitsandbytes' CUDA kernels) and `fastpeft_16bit`
(no quantization: what the quantization costs or saves). All rows share the base weights, LoRA
weights and token ids; extra_info carries tokens/s, peak memory (CUDA) and the rows' loss.
"""
import copy

import pytest
import torch

from bench_common import CUDA, DEVICE, run_pedantic

import fastpeft
from fastpeft.bench.models import DecoderCase, _inputs_require_grad, _make_llama
from fastpeft.bench.timing import cuda_peak_memory

if CUDA:
    CASE = DecoderCase(hidden=2048, intermediate=5504, layers=4, heads=16, kv_heads=16, vocab=32000, seq=1024,
                       batch=4, r=16, dtype=torch.bfloat16, dropout=0.1)
    ROUNDS, WARMUP = 10, 3
else:
    CASE = DecoderCase(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=4, vocab=512, seq=64, batch=2,
                       r=8, dtype=torch.float32, dropout=0.1)
    ROUNDS, WARMUP = 3, 1
IMPLS = ("fastpeft_nf4", "peft_bnb_nf4", "fastpeft_16bit")


def _lora_kwargs():
    return dict(r=CASE.r, lora_alpha=CASE.lora_alpha, lora_dropout=CASE.dropout, target_modules=list(CASE.targets),
                task_type="CAUSAL_LM")


def _to_bnb_nf4(model):
    """Replace the targeted nn.Linear layers by bitsandbytes Linear4bit nf4 layers holding the same weights."""
    import bitsandbytes as bnb

    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in CASE.targets:
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                  compute_dtype=CASE.dtype, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(mod.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], q)
    return model.to(DEVICE)  # moving Params4bit to CUDA quantizes


def _build(impl):
    base = _make_llama(CASE, DEVICE, seed=0)
    base.requires_grad_(False)
    model = copy.deepcopy(base)
    if impl == "fastpeft_nf4":
        fastpeft.quantize(model, "nf4", target_modules=list(CASE.targets), progressbar=False)
        model = fastpeft.get_peft_model(model, fastpeft.LoraConfig(**_lora_kwargs()))
    elif impl == "fastpeft_16bit":
        model = fastpeft.get_peft_model(model, fastpeft.LoraConfig(**_lora_kwargs()))
    else:
        if not CUDA:
            pytest.skip("peft + bitsandbytes nf4 rows need bitsandbytes' CUDA kernels")
        import peft

        model = peft.get_peft_model(_to_bnb_nf4(model.cpu()), peft.LoraConfig(**_lora_kwargs()))
    # the same adapter weights in every row
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    _inputs_require_grad(model.get_base_model())
    model.train()
    return model


@pytest.mark.parametrize("impl", IMPLS)
def test_qlora_training_step(benchmark, impl):
    model = _build(impl)
    g = torch.Generator().manual_seed(2)
    ids = [torch.randint(0, CASE.vocab, (CASE.batch, CASE.seq), generator=g).to(DEVICE) for _ in range(3)]
    counter = {"i": 0}

    def step():
        i = counter["i"] = (counter["i"] + 1) % len(ids)
        loss = model(input_ids=ids[i], labels=ids[i]).loss
        loss.backward()
        return loss

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype.is_floating_point for p in trainable)
    with cuda_peak_memory(DEVICE) as mem:
        loss = step()
    assert torch.isfinite(loss), f"{impl}: loss {loss}"
    benchmark.group = f"qlora step {CASE.label()}"
    benchmark.extra_info.update(dict(impl=impl, tokens=CASE.tokens, device=str(DEVICE), **CASE.to_dict(),
                                     loss=float(loss), peak_mem_bytes=mem.get("peak_bytes"),
                                     trainable_params=sum(p.numel() for p in trainable)))
    run_pedantic(benchmark, step, trainable, ROUNDS, WARMUP)
    if benchmark.stats is not None:
        benchmark.extra_info["tokens_per_s"] = CASE.tokens / benchmark.stats.stats.median
