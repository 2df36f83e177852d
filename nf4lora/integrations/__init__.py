"""Integrations with other libraries: transformers (replace_linear, add_lora, bitsandbytes-4bit
checkpoints), transformers' quantizer plug-in (`nf4lora.integrations.hf_quantizer`:
NF4LoraConfig, NF4LoraQuantizer; reached lazily through `nf4lora.NF4LoraConfig`) and PEFT
(`import nf4lora.integrations.peft`). The last two are not imported here: they import
transformers' quantizers / PEFT, optional and slow to import."""
import contextlib
import logging
import warnings

from .checkpoints import load_pretrained_4bit, save_pretrained_4bit
from .transformers import add_lora, merge_lora, replace_linear

__all__ = ["replace_linear", "add_lora", "merge_lora", "load_pretrained_4bit", "save_pretrained_4bit"]

# Loggers that, while their package is first imported, report optional native pieces they
# could not load: torchao (extensions built for another Python or for CUDA), bitsandbytes
# and `kernels` (bitsandbytes' faster CPU kernel cannot be fetched offline), torch's pytree
# (torchao registering enums the deprecated way). nf4lora needs none of those pieces, and a
# user who only imported nf4lora should not see them.
_IMPORT_NOISE_LOGGERS = ("torchao", "bitsandbytes", "kernels", "torch.utils._pytree")


@contextlib.contextmanager
def _quiet_imports():
    """Around nf4lora's own imports of third-party packages (PEFT, bitsandbytes, a model
    load that makes transformers import its quantizers): their import-time warnings and the
    WARNING records of the loggers above are dropped inside the block only; levels and
    warning filters are restored after it, so nothing later is hidden."""
    loggers = [logging.getLogger(name) for name in _IMPORT_NOISE_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
