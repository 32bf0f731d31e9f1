"""How fastpeft models plug into other libraries (transformers' Trainer, the Hugging Face Hub)."""
