"""VQT: incremental Transformer inference with vector-quantized attention outputs."""

from vqt._version import __version__

from vqt.modeling.config import VQTConfig
from vqt.engine.document import Document, EditStats
from vqt.modeling.model import VQTModel
from vqt.text.document import TextDocument

__all__ = ["VQTConfig", "VQTModel", "Document", "EditStats", "TextDocument"]
