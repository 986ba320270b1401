"""``Kosmos2Processor``: text, images and boxes → model inputs; generated ids → caption and entities.

Mirrors transformers 5.23 ``models/kosmos2/processing_kosmos2.py`` (``Kosmos2Processor.__call__``,
``preprocess_examples``, ``post_process_generation``, ``post_process_image_text_to_text``). docs/numerics.md
§10 (prompt layout, batching, boxes) and §11 (post-processing).

With an image, each text becomes ``<s> <image> [64 image slots] </image> text``: the 64 slots are tokenised as
``<image>`` and then overwritten with the ids ``first_image_token_id … +63`` (4…67 by default), and
``image_embeds_position_mask`` marks them with 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..files import file_present, read_json_object
from ..hub import MINI_FOLDER, MINI_MODEL, is_hub_id, resolve_checkpoint
from . import grounding
from .image import ImageProcessorConfig, as_image_list, preprocess_images
from .tokenizer import BOI_TOKEN, EOI_TOKEN, NUM_PATCH_INDEX_TOKENS, Kosmos2Tokenizer, default_tokenizer


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _is_positive_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= 1


def _to_numpy(name: str, rows) -> np.ndarray:
    """Rows of ints → int64 [B, T]; rows of unequal length cannot form an array."""
    lengths = sorted({len(r) for r in rows})
    if len(lengths) > 1:
        raise ValueError(
            f"{name}: the rows have different lengths {lengths}, so they cannot form one array; "
            "pass padding=True (or 'max_length' with max_length) or return_tensors=None"
        )
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), lengths[0] if lengths else 0)


class Kosmos2Processor:
    """The Kosmos-2 processor: a ``Kosmos2Tokenizer`` plus an ``ImageProcessorConfig``.

    Build it with ``from_pretrained(folder)`` (a Hugging Face checkpoint or processor folder) or ``default()``
    (the real tokenizer shipped in the package, Kosmos-2 image settings).
    """

    def __init__(
        self,
        tokenizer: Kosmos2Tokenizer,
        image_processor_config: ImageProcessorConfig | None = None,
        num_patch_index_tokens: int = NUM_PATCH_INDEX_TOKENS,
    ):
        if not isinstance(tokenizer, Kosmos2Tokenizer):
            raise ValueError(f"tokenizer must be a Kosmos2Tokenizer, got {type(tokenizer).__name__}")
        if not _is_positive_int(num_patch_index_tokens):
            raise ValueError(f"num_patch_index_tokens must be a positive int, got {num_patch_index_tokens!r}")
        self.tokenizer = tokenizer
        self.image_processor_config = image_processor_config or ImageProcessorConfig()
        self.num_patch_index_tokens = num_patch_index_tokens = int(num_patch_index_tokens)
        self.num_patches_per_side = grounding.num_patches_per_side(num_patch_index_tokens)
        # transformers' Kosmos2Processor.__init__ adds the tags and this many patch tokens to its tokenizer.
        tokenizer.add_kosmos2_tokens(num_patch_index_tokens)

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, folder: str | Path, padding_side: str | None = None, **tokenizer_kwargs):
        """Load a processor folder: ``preprocessor_config.json`` (or the ``image_processor`` entry of
        ``processor_config.json``), ``tokenizer.json`` or ``sentencepiece.bpe.model``, and the optional
        ``tokenizer_config.json``, ``special_tokens_map.json``, ``processor_config.json``.

        ``folder`` may also be a Hub id such as ``"microsoft/kosmos-2-patch14-224"``, found in the Hugging Face
        cache (or downloaded) as :meth:`Kosmos2.from_pretrained` finds it, or ``"mini"``, the packaged miniature.
        ``padding_side`` (and other tokenizer settings such as ``truncation_side``) override the files.
        """
        name = folder
        folder = Path(folder) if name != MINI_MODEL else MINI_FOLDER
        if not folder.is_dir() and isinstance(name, str) and not folder.exists() and is_hub_id(name):
            folder = resolve_checkpoint(name, need="processor")  # weights not needed
        if not folder.is_dir():
            raise ValueError(f"processor folder not found: {str(folder)!r}")
        processor_config = {}
        if file_present(folder / "processor_config.json"):
            processor_config = read_json_object(folder / "processor_config.json")
        if file_present(folder / "preprocessor_config.json"):
            image_config = ImageProcessorConfig.from_json_file(folder / "preprocessor_config.json")
        elif isinstance(processor_config.get("image_processor"), dict):
            source = f"{str(folder / 'processor_config.json')!r} (its 'image_processor' entry)"
            image_config = ImageProcessorConfig.from_dict(processor_config["image_processor"], source)
        else:
            raise ValueError(
                f"no image processor settings in {str(folder)!r}: expected preprocessor_config.json "
                "(or processor_config.json with an 'image_processor' entry)"
            )
        if padding_side is not None:
            tokenizer_kwargs["padding_side"] = padding_side
        # The processor adds the tag and patch tokens itself, num_patch_index_tokens of them (as transformers does).
        tokenizer = Kosmos2Tokenizer.from_pretrained(folder, add_kosmos2_tokens=False, **tokenizer_kwargs)
        num_patch_index_tokens = processor_config.get("num_patch_index_tokens", NUM_PATCH_INDEX_TOKENS)
        return cls(tokenizer, image_config, num_patch_index_tokens)

    @classmethod
    def default(cls, padding_side: str = "right", **tokenizer_kwargs) -> "Kosmos2Processor":
        """The Kosmos-2 processor without a checkpoint folder: the real tokenizer from the SentencePiece model
        shipped in ``kosmos2_ref/assets`` and the image settings of docs/numerics.md §12.1."""
        tokenizer = default_tokenizer(padding_side=padding_side, **tokenizer_kwargs)
        return cls(tokenizer, ImageProcessorConfig())

    def save_pretrained(self, folder: str | Path) -> list[Path]:
        """Write preprocessor_config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json (and
        processor_config.json when the patch-token count is not 1024), loadable by transformers'
        ``AutoProcessor.from_pretrained``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "preprocessor_config.json"
        path.write_text(json.dumps(self.image_processor_config.to_dict(), indent=2, sort_keys=True) + "\n")
        paths = [path] + self.tokenizer.save_pretrained(folder)
        if self.num_patch_index_tokens != NUM_PATCH_INDEX_TOKENS:
            path = folder / "processor_config.json"
            config = {"num_patch_index_tokens": self.num_patch_index_tokens, "processor_class": "Kosmos2Processor"}
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            paths.append(path)
        return paths

    # ------------------------------------------------------------------------------------------------ the prompt
    def _prepare_texts(self, texts: list[str], with_image: list[bool], bboxes: list, num_image_tokens: int):
        """Strip each text, put ``<image> [slots] </image>`` before it when it has an image, and add its box
        tokens (preprocess_examples / _preprocess_single_example)."""
        image_info = " ".join([BOI_TOKEN] + [BOI_TOKEN] * num_image_tokens + [EOI_TOKEN])
        out = []
        for text, has_image, boxes in zip(texts, with_image, bboxes):
            text = text.strip()
            if has_image:
                text = f"{image_info} {text}"
            out.append(grounding.insert_patch_index_tokens(text, boxes, self.num_patch_index_tokens))
        return out

    def _check_bboxes(self, bboxes, batched: bool, count: int) -> list:
        """Validate ``bboxes`` against the texts and return one entry per text."""
        if not batched:
            grounding.check_bboxes_for_single_text(bboxes, "", self.num_patch_index_tokens)
            return [bboxes]
        if bboxes is None:
            return [None] * count
        if not isinstance(bboxes, list):
            raise ValueError(
                f"bboxes must be None or a list with one entry per text when text is a batch, got "
                f"{type(bboxes).__name__}"
            )
        if len(bboxes) != count:
            raise ValueError(f"bboxes has {len(bboxes)} entries but text has {count}; they must be equal")
        for i, entry in enumerate(bboxes):
            grounding.check_bboxes_for_single_text(entry, f"[{i}]", self.num_patch_index_tokens)
        return list(bboxes)

    def _image_slots(self, rows: list[list[int]], with_bos: bool, first_id: int, num_image_tokens: int):
        """Overwrite the fake ``<image>`` ids with first_id…first_id+num−1 and build image_embeds_position_mask.

        The slots start after ``<s>`` (if any) and the real ``<image>``: index with_bos + 1. The mask is
        [0 (<s>)] + [0 (<image>)] + [1]·num + [0 (</image>)], then zeros to the row's length.
        """
        start = int(with_bos) + 1
        slot_ids = list(range(first_id, first_id + num_image_tokens))
        base_mask = [0] * int(with_bos) + [0] + [1] * num_image_tokens + [0]
        ids_out, masks = [], []
        for row in rows:
            row = row[:start] + slot_ids + row[start + num_image_tokens :]
            ids_out.append(row)
            masks.append(base_mask + [0] * (len(row) - len(base_mask)))
        return ids_out, masks

    def __call__(
        self,
        images=None,
        text: str | Sequence[str] | None = None,
        bboxes=None,
        *,
        num_image_tokens: int = 64,
        first_image_token_id: int | None = None,
        add_special_tokens: bool = True,
        add_eos_token: bool = False,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        padding_side: str | None = None,
        pad_to_multiple_of: int | None = None,
        return_tensors: str | None = "np",
    ) -> dict:
        """Model inputs for ``text`` (a string or a list), ``images`` (one per text) and ``bboxes``.

        Returns a dict with ``pixel_values`` [B, 3, 224, 224] float32 (when images are given), ``input_ids`` and
        ``attention_mask`` [B, T] int64, and ``image_embeds_position_mask`` [B, T] int64 (when both are given).
        With ``return_tensors=None`` the ids are lists (flat for a single string), as in transformers.

        With images, rows of unequal length are always padded to the longest (or to ``max_length`` with
        ``padding="max_length"``), with pad id 1 and mask 0, on ``padding_side`` (default: the tokenizer's).
        transformers 5.23 pads such rows on the tokenizer's side only and ignores a ``padding_side`` given here.
        """
        if images is None and text is None:
            raise ValueError("pass text, images or both; got neither")
        add_special_tokens, add_eos_token, num_image_tokens = _check_options(
            return_tensors, add_special_tokens, add_eos_token, num_image_tokens
        )

        encoding: dict = {}
        image_list = None
        if images is not None:
            image_list = as_image_list(images, "images")
            pixel_values = preprocess_images(image_list, self.image_processor_config, "images")
            encoding["pixel_values"] = pixel_values if return_tensors == "np" else list(pixel_values)
        if text is None:
            return encoding

        batched = not isinstance(text, str)
        texts = _check_texts(text, image_list)
        boxes = self._check_bboxes(bboxes, batched, len(texts))
        prompts = self._prepare_texts(texts, [image_list is not None] * len(texts), boxes, num_image_tokens)
        if add_special_tokens and not add_eos_token:
            # A literal "<s>" is tokenised as the bos token; </s> is only added through the template (add_eos_token).
            prompts = [f"{self.tokenizer.bos_token}{p}" for p in prompts]
        tokenizer_kwargs = dict(
            add_special_tokens=add_special_tokens and add_eos_token,
            truncation=truncation,
            max_length=max_length,
            padding_side=padding_side,
            pad_to_multiple_of=pad_to_multiple_of,
        )

        if image_list is None:
            ids, mask = self.tokenizer.encode_batch(prompts, padding=padding, **tokenizer_kwargs)
            rows = {"input_ids": ids, "attention_mask": mask}
        else:
            rows = self._encode_with_images(prompts, padding, tokenizer_kwargs, add_special_tokens,
                                            first_image_token_id, num_image_tokens)  # fmt: skip

        for key, value in rows.items():
            if return_tensors == "np":
                encoding[key] = _to_numpy(key, value)
            else:
                encoding[key] = value if batched else value[0]
        return encoding

    def _encode_with_images(self, prompts, padding, tokenizer_kwargs, with_bos, first_image_token_id, num_image_tokens):
        """Tokenise prompts that carry an image, fill the image slots, then pad rows to a common length."""
        if first_image_token_id is None:
            first_image_token_id = self.tokenizer.unk_token_id + 1  # 4: the first id after <unk>
        vocab_size = len(self.tokenizer)
        if (
            isinstance(first_image_token_id, bool)
            or not isinstance(first_image_token_id, (int, np.integer))
            or not 0 <= first_image_token_id <= vocab_size - num_image_tokens
        ):
            raise ValueError(
                f"first_image_token_id must be an int with first_image_token_id + num_image_tokens <= {vocab_size} "
                f"(the vocabulary size), got {first_image_token_id!r} with num_image_tokens={num_image_tokens}"
            )
        padding_side = tokenizer_kwargs["padding_side"] or self.tokenizer.padding_side
        raw_ids, raw_mask = self.tokenizer.encode_batch(prompts, padding=False, **tokenizer_kwargs)
        needed = int(with_bos) + num_image_tokens + 2  # [<s>] <image> slots </image>
        if min(len(r) for r in raw_ids) < needed:
            # transformers would splice the slots past the end and return ids and masks of different lengths
            raise ValueError(
                f"max_length={tokenizer_kwargs['max_length']} truncates the image tokens: a prompt with an image "
                f"needs at least {needed} tokens here"
            )
        ids, image_mask = self._image_slots(raw_ids, with_bos, int(first_image_token_id), num_image_tokens)
        attention = raw_mask
        # transformers' rule: the target length is the length of the longest prompt tokenised with the caller's
        # padding/truncation settings; if the shortest unpadded row differs from it, every row is padded to it
        # (so rows of unequal length are padded even with padding=False).
        longest = max(range(len(raw_ids)), key=lambda i: (len(raw_ids[i]), i))
        shortest = min(len(r) for r in raw_ids)
        target = len(self.tokenizer.encode_batch([prompts[longest]], padding=padding, **tokenizer_kwargs)[0][0])
        if shortest != target:
            pad_id = self.tokenizer.pad_token_id
            if pad_id is None:
                raise ValueError("the rows need padding, but the tokenizer has no pad_token")
            ids = [_pad(r, target, pad_id, padding_side) for r in ids]
            image_mask = [_pad(r, target, 0, padding_side) for r in image_mask]
            attention = [_pad(r, target, 0, padding_side) for r in attention]
        return {"input_ids": ids, "attention_mask": attention, "image_embeds_position_mask": image_mask}

    # ----------------------------------------------------------------------------------------------- decoding
    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str:
        """Text of one id sequence (see ``Kosmos2Tokenizer.decode``)."""
        return self.tokenizer.decode(ids, skip_special_tokens, clean_up_tokenization_spaces)

    def batch_decode(
        self, sequences, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None
    ) -> list[str]:
        """Texts of a [B, T] array or list of id lists."""
        return self.tokenizer.batch_decode(sequences, skip_special_tokens, clean_up_tokenization_spaces)

    def post_process_generation(self, text: str, cleanup_and_extract: bool = True):
        """Caption after ``</image>``; with ``cleanup_and_extract``: (clean caption, entities)
        (docs/numerics.md §11).

        Boxes are decoded on the 32 × 32 grid whatever ``num_patch_index_tokens`` is, as transformers 5.23 does
        (its post_process_generation never passes the grid size on); only 1024 patch tokens exist in practice.
        """
        return grounding.post_process_generation(text, cleanup_and_extract, num_patches_per_side=32)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """Decode a batch of generated ids and return the raw captions after ``</image>`` (tags kept)."""
        texts = self.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)
        return [self.post_process_generation(t, cleanup_and_extract=False) for t in texts]

    def entities_to_pixel_boxes(self, entities, image_size: tuple[int, int]):
        """Post-processing's entity tuples -> :class:`~kosmos2_ref.processing.grounding.Entity` objects with their
        boxes also in pixels of an image of ``image_size = (width, height)`` (grounding.entities_to_pixel_boxes)."""
        return grounding.entities_to_pixel_boxes(entities, image_size)


def _pad(row: list[int], length: int, value: int, side: str) -> list[int]:
    """Pad ``row`` with ``value`` to ``length`` on ``side`` (a longer row is left as it is, as in transformers)."""
    fill = [value] * (length - len(row))
    return row + fill if side == "right" else fill + row


def _check_texts(text, image_list) -> list[str]:
    """``text`` (a str or a non-empty list of str) as a list, checked to pair one image with each text."""
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, (list, tuple)) or len(texts) == 0:
        raise ValueError(f"text must be a str or a non-empty list of str, got {text!r}"[:300])
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"text[{i}] must be a str, got {type(t).__name__}")
    if image_list is not None and len(image_list) != len(texts):
        raise ValueError(
            f"text and images must pair one image with each text; got {len(texts)} texts and {len(image_list)} images"
        )
    return list(texts)


def _check_options(return_tensors, add_special_tokens, add_eos_token, num_image_tokens) -> tuple[bool, bool, int]:
    """The processor call's switches, checked: (add_special_tokens, add_eos_token, num_image_tokens)."""
    if return_tensors not in (None, "np"):
        raise ValueError(f"return_tensors must be 'np' or None, got {return_tensors!r}")
    if not _is_positive_int(num_image_tokens):
        raise ValueError(f"num_image_tokens must be a positive int, got {num_image_tokens!r}")
    return (
        _check_bool("add_special_tokens", add_special_tokens),
        _check_bool("add_eos_token", add_eos_token),
        int(num_image_tokens),
    )
