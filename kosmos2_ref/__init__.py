"""kosmos2_ref: a pure-NumPy reference implementation of KOSMOS-2 (microsoft/kosmos-2-patch14-224).

    from kosmos2_ref import Kosmos2
    model = Kosmos2.from_pretrained("path/to/checkpoint")
"""
from .backend import get_backend, to_numpy
from .config import Kosmos2Config, TextConfig, VisionConfig
from .model import Kosmos2, Kosmos2Output
from .processing import Kosmos2Processor

__version__ = "0.1.0"
__all__ = ["Kosmos2", "Kosmos2Output", "Kosmos2Processor", "Kosmos2Config", "TextConfig", "VisionConfig", "get_backend", "to_numpy"]
