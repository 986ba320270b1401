"""Processing for KOSMOS-2: images → pixel_values, text and boxes → ids and masks, ids → caption and entities.

It knows nothing of the model (docs/architecture.md). Mirrors transformers 5.23 ``Kosmos2Processor`` with the
``CLIPImageProcessorPil`` image path; docs/numerics.md §9, §10, §11 and §12.
"""

from .grounding import (
    Entity,
    box_to_patch_indices,
    box_to_pixels,
    clean_text_and_extract_entities_with_bboxes,
    entities_to_pixel_boxes,
    extract_entities_with_patch_indices,
    patch_indices_to_box,
    post_process_generation,
)
from .image import ImageProcessorConfig, preprocess_images
from .processor import Kosmos2Processor
from .tokenizer import Kosmos2Tokenizer, build_tokenizer_from_sentencepiece, default_tokenizer

__all__ = [
    "Entity",
    "ImageProcessorConfig",
    "Kosmos2Processor",
    "Kosmos2Tokenizer",
    "box_to_patch_indices",
    "box_to_pixels",
    "build_tokenizer_from_sentencepiece",
    "clean_text_and_extract_entities_with_bboxes",
    "default_tokenizer",
    "entities_to_pixel_boxes",
    "extract_entities_with_patch_indices",
    "patch_indices_to_box",
    "post_process_generation",
    "preprocess_images",
]
