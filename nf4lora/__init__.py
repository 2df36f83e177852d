"""nf4lora: hand-written kernels for QLoRA (NF4/FP4 4-bit weights + LoRA adapters).

The format is bitsandbytes' byte for byte; see README.md for the API and numbers.
"""
from . import _ops, functional  # noqa: F401  (registers the torch.library ops)
from . import integrations, nn  # noqa: F401
from .autograd import lora_matmul_4bit, matmul_4bit  # noqa: F401
from .backends import available_backends, get_backend, set_backend  # noqa: F401
from .functional import QuantState  # noqa: F401
from .integrations import (add_lora, load_pretrained_4bit, merge_lora, replace_linear,  # noqa: F401
                           save_pretrained_4bit)

__version__ = "0.1.0"
