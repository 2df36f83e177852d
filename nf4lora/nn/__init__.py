"""nf4lora.nn: bitsandbytes' 4-bit layers (same names and signatures) and the LoRA layer."""
from .embedding4bit import Embedding4bit, EmbeddingFP4, EmbeddingNF4
from .linear4bit import Linear4bit, LinearFP4, LinearNF4, Params4bit
from .lora import LoraLinear4bit

__all__ = ["Params4bit", "Linear4bit", "LinearNF4", "LinearFP4", "Embedding4bit", "EmbeddingNF4",
           "EmbeddingFP4", "LoraLinear4bit"]
