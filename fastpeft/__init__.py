"""fastpeft: peft-compatible parameter-efficient fine-tuning on fused kernels."""
__version__ = "0.1.0"
