"""LoraConfig fields of peft 0.21.2 that fastpeft keeps in its files but refuses to run, and why.

LoraModel raises NotImplementedError naming each field set on a config, what it is and why it is not here;
HF peft runs all of them (load such an adapter with peft). The config itself still reads and writes these
fields unchanged, so an adapter_config.json passes through fastpeft losslessly.
"""
from __future__ import annotations

# field -> (what it is, why fastpeft does not run it)
REASONS = {
    "velora_config": (
        "VeLoRA: compresses the activations LoRA saves for backward into rank-1 group projections, so the "
        "gradients of lora_A are approximate",
        "it needs its own backward in fastpeft.ops (the fused op saves x itself and gives exact gradients); "
        "a training-memory method with no effect on saved files or inference"),
    "monteclora_config": (
        "MonteCLoRA: the LoRA weights perturbed in training by Monte Carlo samples (Gaussian, Wishart and "
        "Dirichlet draws) with extra variational parameters and a KL term added to the loss",
        "experimental: stochastic weights, extra trainable tensors and a loss term outside the layer's op"),
    "arrow_config": (
        "Arrow: per-token routing over a library of task LoRA experts (top-k by the experts' principal "
        "directions), optionally with GenKnowSub",
        "a router over many adapters per layer, built from other loaded adapters: not a single-adapter op"),
    "kasa_config": (
        "KaSA: truncates the base weight by SVD, trains a diagonal of singular values between B and A, with "
        "orthogonality regularisers",
        "it rewrites the base weight (deferred SVD truncation) and adds an r x r diagonal and loss terms; "
        "experimental"),
    "megatron_config": (
        "LoRA on Megatron-LM tensor-parallel linear layers (ColumnParallelLinear / RowParallelLinear)",
        "fastpeft has no Megatron layer types"),
    "layer_replication": (
        "layer replication: the layer stack grows by repeating base layers that share weights, each copy "
        "with its own adapter",
        "it restructures the model before injection; not done yet"),
}


def refusal_message(adapter_name: str, fields: list) -> str:
    lines = [f"LoraConfig for adapter {adapter_name!r} sets fields fastpeft does not implement: {', '.join(fields)}."]
    for f in fields:
        what, why = REASONS.get(f, (None, None))
        if what:
            lines.append(f"  {f}: {what}. Not in fastpeft: {why}.")
    lines.append("HF peft runs these (load the adapter with peft), or reset the fields to their defaults.")
    return "\n".join(lines)
