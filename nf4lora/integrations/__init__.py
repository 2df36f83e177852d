"""Integrations with other libraries (transformers; PEFT to come)."""
from .transformers import add_lora, replace_linear

__all__ = ["replace_linear", "add_lora"]
