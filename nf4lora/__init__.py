"""nf4lora: hand-written kernels for QLoRA (NF4/FP4 4-bit weights + LoRA adapters).

The format is bitsandbytes' byte for byte; see README.md for the API and numbers.
"""
from . import _ops, functional  # noqa: F401  (registers the torch.library ops)
from . import integrations, nn  # noqa: F401
from .autograd import (dora_matmul_4bit, dora_row_norms_4bit, lora_matmul_4bit,  # noqa: F401
                       matmul_4bit, multi_lora_matmul_4bit, pad_adapters, row_sq_norms_4bit)
from .backends import available_backends, get_backend, set_backend  # noqa: F401
from .codebook import fit_codebook  # noqa: F401
from .functional import QuantState  # noqa: F401
from .integrations import (add_lora, load_pretrained_4bit, merge_lora, replace_linear,  # noqa: F401
                           save_pretrained_4bit)

__version__ = "0.1.0"

# transformers' quantization method (`from_pretrained(..., quantization_config=NF4LoraConfig())`):
# imported, and registered with transformers, on first use of one of these names, because
# importing transformers' quantizers costs seconds and pulls in torchao; `import nf4lora`
# stays fast and works without transformers. Nothing can reach the "nf4lora" method before
# one of these names is used: checkpoints are saved in bitsandbytes' format.
_HF_QUANTIZER_NAMES = ("NF4LoraConfig", "NF4LoraQuantizer", "from_pretrained")


def __getattr__(name):
    if name in _HF_QUANTIZER_NAMES:
        from .integrations import hf_quantizer
        return getattr(hf_quantizer, name)
    raise AttributeError(f"module 'nf4lora' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_HF_QUANTIZER_NAMES))
