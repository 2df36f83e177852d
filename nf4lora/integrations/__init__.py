"""Integrations with other libraries: transformers (replace_linear, add_lora, bitsandbytes-4bit
checkpoints) and PEFT (`import nf4lora.integrations.peft`, not imported here: PEFT is an
optional dependency and slow to import)."""
from .checkpoints import load_pretrained_4bit, save_pretrained_4bit
from .transformers import add_lora, replace_linear

__all__ = ["replace_linear", "add_lora", "load_pretrained_4bit", "save_pretrained_4bit"]
