"""VQT: incremental Transformer inference with vector-quantized attention outputs."""

from .config import VQTConfig
from .engine import Document, EditStats
from .model import VQTModel
from .text import TextDocument

__all__ = ["VQTConfig", "VQTModel", "Document", "EditStats", "TextDocument"]
__version__ = "0.1.0"
