"""kosmos2_ref: a pure-NumPy reference implementation of KOSMOS-2 (microsoft/kosmos-2-patch14-224).

from kosmos2_ref import Kosmos2, generate
model = Kosmos2.from_pretrained("path/to/checkpoint")
ids = generate(model, **inputs, max_new_tokens=64)      # inputs: Kosmos2Processor(...)'s arrays
"""

from .backend import get_backend, to_numpy
from .config import Kosmos2Config, TextConfig, VisionConfig
from .generation import generate
from .model import Kosmos2, Kosmos2Output
from .processing import Kosmos2Processor
from .version import __version__  # noqa: F401 (kosmos2_ref.__version__)

__all__ = [
    "Kosmos2",
    "Kosmos2Output",
    "generate",
    "Kosmos2Processor",
    "Kosmos2Config",
    "TextConfig",
    "VisionConfig",
    "get_backend",
    "to_numpy",
]
