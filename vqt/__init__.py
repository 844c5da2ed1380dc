"""VQT: incremental Transformer inference with vector-quantized attention outputs."""

from .config import VQTConfig
from .engine import Document, EditStats
from .model import VQTModel

__all__ = ["VQTConfig", "VQTModel", "Document", "EditStats"]
__version__ = "0.1.0"
