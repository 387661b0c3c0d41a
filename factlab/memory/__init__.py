"""Memory experts: a product-key bank of memory slots attached to a frozen backbone
(``MemoryModel``), tuned on the one loop until every stored fact is recalled exactly
(``MemoryTuning``). See docs/memory.md."""

from factlab.memory.bank import ProductKeyMemory, bank_bytes
from factlab.memory.model import MemoryModel, decoder_layers
from factlab.memory.tune import MemoryTuning

__all__ = ["ProductKeyMemory", "bank_bytes", "MemoryModel", "decoder_layers", "MemoryTuning"]
