"""Image preprocessing: image → pixel_values [B, 3, 224, 224] float32, bit-identical to transformers' PIL path.

Mirrors transformers 5.23 ``models/clip/image_processing_pil_clip.py`` (``CLIPImageProcessorPil``, with the
``use_square_size`` branch kept "for backwards compatibility of KOSMOS-2"), ``image_processing_backends.py``
(``PilBackend.process_image`` / ``_preprocess``), ``image_transforms.py`` (``convert_to_rgb``, ``resize``,
``to_pil_image``, ``center_crop``, ``rescale``, ``normalize``) and ``image_utils.py`` (``load_image``).
docs/numerics.md §12.

Pipeline per image:
1. RGB: a PIL image with an alpha band or transparency info is composited onto white with Pillow; other modes use
   ``convert("RGB")``. Paths are opened, EXIF-rotated and converted with ``convert("RGB")`` (transformers'
   ``load_image``; alpha is dropped there, not composited). Arrays: grey is repeated, RGBA blended onto white in
   floating point and rounded. PIL images (and files) of more than 8 bits per sample (modes I;16, I, F) are
   refused: Pillow would clip them to 8 bits (transformers does, silently).
2. Resize with Pillow in uint8 (BICUBIC, to 224×224 for Kosmos-2: ``use_square_size`` ignores the aspect ratio).
3. Center crop (a no-op at 224×224).
4. Rescale: float64 multiply by 1/255, then cast to float32.
5. Normalise in float32 with the CLIP mean and std; HWC → CHW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageMode
import PIL.ImageOps

from ..checks import is_int, is_real
from ..files import file_present, read_json_object

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# CLIPImageProcessorPil.size["shortest_edge"]: with use_square_size transformers 5.x resizes to this square,
# whatever size the config names (docs/numerics.md §12.4).
CLIP_DEFAULT_SHORTEST_EDGE = 224


# ------------------------------------------------------------------------------------------------ configuration
# The settings come from JSON, so each is checked for its JSON type: Python's bool("false") is True and
# float("nan") is a float, and a bad value would otherwise surface deep in Pillow or as NaN pixels.
def _json_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be true or false (a JSON boolean), got {value!r}")
    return bool(value)


def _positive_int(value, name: str) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _positive_number(value, name: str) -> float:
    if not is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _channel_values(value, name: str, positive: bool) -> tuple:
    """image_mean / image_std: one number for all channels or one per RGB channel, finite (std also > 0, as it
    divides)."""
    if is_real(value):
        value = [value] * 3
    if not isinstance(value, (list, tuple)) or not all(is_real(v) for v in value):
        raise ValueError(f"{name} must be a number or a list of 3 numbers (one per RGB channel), got {value!r}")
    if len(value) != 3:
        raise ValueError(f"{name} must have 3 values (one per RGB channel), got {value!r}")
    if not all(math.isfinite(v) and (v > 0 or not positive) for v in value):
        expected = "finite numbers > 0" if positive else "finite numbers"
        raise ValueError(f"{name} must hold {expected}, got {value!r}")
    return tuple(float(v) for v in value)


def _size_dict(size, name: str, default_to_square: bool) -> dict:
    """Normalise a size argument as transformers' ``get_size_dict`` does: an int is a shortest edge (or a square
    when ``default_to_square``), a pair is (height, width), a dict keeps height/width or shortest_edge. Every
    side must be a positive int."""
    if is_int(size):
        side = _positive_int(size, name)
        return {"height": side, "width": side} if default_to_square else {"shortest_edge": side}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": _positive_int(size[0], f"{name}[0]"), "width": _positive_int(size[1], f"{name}[1]")}
    if isinstance(size, dict) and set(size) in ({"height", "width"}, {"shortest_edge"}):
        return {key: _positive_int(size[key], f"{name}.{key}") for key in sorted(size)}
    raise ValueError(
        f"{name} must be an int, a (height, width) pair, {{'height', 'width'}} or {{'shortest_edge'}}, got {size!r}"
    )


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The settings of ``preprocessor_config.json`` (docs/numerics.md §12.1), defaulting to Kosmos-2's.

    ``size`` and ``crop_size`` are kept as the file gives them (after ``get_size_dict`` normalisation); what the
    resize actually uses is ``resize_target``.
    """

    do_resize: bool = True
    size: dict = field(default_factory=lambda: {"shortest_edge": 224})
    use_square_size: bool = True
    resample: int = 3  # PIL.Image.BICUBIC
    do_center_crop: bool = True
    crop_size: dict = field(default_factory=lambda: {"height": 224, "width": 224})
    do_rescale: bool = True
    rescale_factor: float = 1.0 / 255.0
    do_normalize: bool = True
    image_mean: tuple = OPENAI_CLIP_MEAN
    image_std: tuple = OPENAI_CLIP_STD
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, data: dict, source: str | None = None) -> "ImageProcessorConfig":
        """Read the known keys of a preprocessor config dict; unknown keys are ignored, a null value means the
        default, and a bad value raises a ValueError naming the key (and ``source``, the file, when given)."""
        try:
            return cls._parse(data)
        except ValueError as err:
            if source is None:
                raise
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def _parse(cls, data: dict) -> "ImageProcessorConfig":
        given = {key: value for key, value in data.items() if value is not None}
        kwargs: dict[str, Any] = {}
        for key in ("do_resize", "use_square_size", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            if key in given:
                kwargs[key] = _json_bool(given[key], key)
        if "size" in given:
            kwargs["size"] = _size_dict(given["size"], "size", default_to_square=False)
        if "crop_size" in given:
            kwargs["crop_size"] = _size_dict(given["crop_size"], "crop_size", default_to_square=True)
        if "resample" in given:
            resample = given["resample"]
            if not is_int(resample) or resample not in {int(r) for r in PIL.Image.Resampling}:
                raise ValueError(f"resample must be a PIL resampling filter id (0-5), got {resample!r}")
            kwargs["resample"] = int(resample)
        if "rescale_factor" in given:
            kwargs["rescale_factor"] = _positive_number(given["rescale_factor"], "rescale_factor")
        if "image_mean" in given:
            kwargs["image_mean"] = _channel_values(given["image_mean"], "image_mean", positive=False)
        if "image_std" in given:
            kwargs["image_std"] = _channel_values(given["image_std"], "image_std", positive=True)
        config = cls(**kwargs)
        if not {"height", "width"} <= set(config.crop_size):
            raise ValueError(f"crop_size must give height and width, got {config.crop_size!r}")
        return config

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ImageProcessorConfig":
        data = read_json_object(path)
        source = repr(str(path))
        # processor_config.json (transformers 5.x save_pretrained) nests the image settings.
        if isinstance(data.get("image_processor"), dict):
            data, source = data["image_processor"], f"{source} (its 'image_processor' entry)"
        return cls.from_dict(data, source)

    def to_dict(self) -> dict:
        """The preprocessor_config.json content (docs/numerics.md §12.1: 14 keys for the Kosmos-2
        defaults)."""
        out = {
            "crop_size": dict(self.crop_size),
            "do_center_crop": self.do_center_crop,
            "do_convert_rgb": self.do_convert_rgb,
            "do_normalize": self.do_normalize,
            "do_rescale": self.do_rescale,
            "do_resize": self.do_resize,
            "image_mean": list(self.image_mean),
            "image_processor_type": "CLIPImageProcessor",
            "image_std": list(self.image_std),
            "processor_class": "Kosmos2Processor",
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "size": dict(self.size),
        }
        if self.use_square_size:
            out["use_square_size"] = True
        return out

    def resize_target(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize step for an image of ``height × width``."""
        if self.use_square_size:
            return CLIP_DEFAULT_SHORTEST_EDGE, CLIP_DEFAULT_SHORTEST_EDGE
        if "height" in self.size:
            return self.size["height"], self.size["width"]
        # shortest edge to N, the long edge scaled and truncated (get_resize_output_image_size).
        target = self.size["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = target, int(target * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def seen_box(self, box, image_size: tuple[int, int]) -> tuple[float, float, float, float] | None:
        """A box (x1, y1, x2, y2) normalised to the whole picture of ``image_size`` (width, height) → normalised
        to the picture the model reads (after the resize and the centre crop), clipped to it; None when none of
        the box is read. Kosmos-2's square resize keeps everything; a centre crop cuts the sides off."""
        width, height = image_size
        h, w = self.resize_target(height, width) if self.do_resize else (height, width)  # after the resize
        ch, cw = (self.crop_size["height"], self.crop_size["width"]) if self.do_center_crop else (h, w)
        top, left = (h - ch) // 2, (w - cw) // 2  # the crop's corner (< 0 where it pads a small picture)
        x1, y1, x2, y2 = box
        seen = ((x1 * w - left) / cw, (y1 * h - top) / ch, (x2 * w - left) / cw, (y2 * h - top) / ch)
        x1, y1, x2, y2 = (min(1.0, max(0.0, v)) for v in seen)
        return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None

    def seen_image(self, pixel_values) -> np.ndarray:
        """One image's ``pixel_values`` [3, H, W] → the picture the model reads, [H, W, 3] uint8: the
        normalisation and the rescale undone (to the nearest grey level)."""
        x = np.asarray(pixel_values, dtype=np.float64)  # [3, H, W]
        if x.ndim != 3 or x.shape[0] != 3:
            raise ValueError(f"pixel_values: expected one image's [3, H, W], got shape {x.shape}")
        if self.do_normalize:
            x = x * np.asarray(self.image_std)[:, None, None] + np.asarray(self.image_mean)[:, None, None]
        if self.do_rescale:
            x = x / self.rescale_factor
        return np.uint8(np.clip(np.round(x), 0, 255)).transpose(1, 2, 0)  # [3, H, W] -> [H, W, 3]


# ---------------------------------------------------------------------------------------------------- loading
def _describe(image) -> str:
    if isinstance(image, np.ndarray):
        return f"an array of shape {image.shape} and dtype {image.dtype}"
    if isinstance(image, PIL.Image.Image):
        return f"a PIL image of mode {image.mode} and size {image.size}"
    return f"{type(image).__name__} {image!r}"[:200]


def _check_8_bit(image: PIL.Image.Image, name: str, what: str) -> None:
    """Refuse modes of more than 8 bits per sample (I;16, I;16B, I;16L, I, F): Pillow's ``convert`` clips them to
    [0, 255] without a word, so a 16-bit PNG would come out nearly white and a float image in [0, 1] black."""
    sample = np.dtype(PIL.ImageMode.getmode(image.mode).typestr)  # uint8 (or bool for mode 1) in 8-bit modes
    if sample.itemsize > 1:
        kind = "float" if sample.kind == "f" else "integer"
        raise ValueError(
            f"{name}: {what} has mode {image.mode} ({8 * sample.itemsize}-bit {kind} pixels), which would be "
            "clipped to 8 bits; expected an 8-bit image (mode 1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, ...): "
            "convert it first, e.g. pass np.asarray(image) scaled to floats in [0, 1]"
        )


def open_image_file(path: str | Path, name: str = "image") -> PIL.Image.Image:
    """Open an image file fully, apply its EXIF orientation and convert to RGB (transformers' ``load_image``).

    Raises ValueError naming the path when it is missing, not an image, corrupt, or not 8-bit. Used by
    :func:`load_image` and :func:`to_rgb_uint8`; call :func:`load_image`, which takes any image.
    """
    path = Path(path)
    try:
        present = file_present(path)
    except ValueError as err:  # a broken link, a folder, a pipe
        raise ValueError(f"{name}: {err}") from None
    if not present:
        raise ValueError(f"{name}: image file not found: {str(path)!r}")
    try:
        with PIL.Image.open(path) as opened:
            opened.load()  # decode now, so a truncated file fails here and not later
            image = PIL.ImageOps.exif_transpose(opened)  # a copy, still readable once the file is closed
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as err:
        raise ValueError(f"{name}: {str(path)!r} is not a readable image file ({type(err).__name__}: {err})") from err
    _check_8_bit(image, name, f"the image file {str(path)!r}")
    return image.convert("RGB")


def _pil_to_rgb(image: PIL.Image.Image, name: str) -> np.ndarray:
    """PIL image → [H, W, 3] uint8; transparency is composited onto white (image_transforms.convert_to_rgb)."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{name}: the image is empty ({_describe(image)}); expected at least 1×1 pixels")
    try:
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if has_alpha:
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = PIL.Image.alpha_composite(white, rgba).convert("RGB")
        else:
            rgb = image.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"{name}: cannot convert {_describe(image)} to RGB ({err})") from err
    return np.asarray(rgb, dtype=np.uint8)


def _check_array(image: np.ndarray, name: str) -> np.ndarray:
    """Validate an array image and return it as [H, W, C] with C in (1, 3, 4)."""
    if image.size == 0:
        raise ValueError(f"{name}: the array is empty ({_describe(image)}); expected at least 1×1 pixels")
    if image.ndim == 2:
        image = image[:, :, None]  # [H, W] -> [H, W, 1]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"{name}: expected an array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (channels last), "
            f"got {_describe(image)}"
        )
    real_valued = np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)
    if image.dtype == np.bool_ or not real_valued:
        raise ValueError(f"{name}: expected a uint8 or float array, got {_describe(image)}")
    if np.issubdtype(image.dtype, np.floating) and not np.all(np.isfinite(image)):
        raise ValueError(f"{name}: the array holds NaN or infinite values ({_describe(image)})")
    return image


def _array_to_rgb(image: np.ndarray, name: str) -> np.ndarray:
    """[H, W, C] array → [H, W, 3] of the same dtype (convert_to_rgb on arrays).

    Grey is repeated; RGBA is blended onto white: alpha·rgb + (1 − alpha)·white with white = 255 (integers,
    rounded) or 1.0 (floats, which must then lie in [0, 1]).
    """
    channels = image.shape[2]
    if channels == 1:
        return np.repeat(image, 3, axis=2)  # [H, W, 1] -> [H, W, 3]
    if channels == 3:
        return image
    if np.issubdtype(image.dtype, np.integer):
        alpha = image[..., 3:4] / 255  # float64 [H, W, 1]
        blended = alpha * image[..., :3] + (1 - alpha) * 255
        return np.round(blended).astype(image.dtype)
    if image.min() < 0.0 or image.max() > 1.0:
        raise ValueError(
            f"{name}: a float RGBA array must lie in [0, 1] to be blended onto white, "
            f"got values in [{image.min()}, {image.max()}]"
        )
    alpha = image[..., 3:4] / 1.0
    return (alpha * image[..., :3] + (1 - alpha) * 1.0).astype(image.dtype)


def _array_to_uint8(image: np.ndarray, name: str) -> np.ndarray:
    """[H, W, 3] of any real dtype → uint8.

    A float array whose values all lie in [0, 1] holds intensities: scaled by 255 (float64 multiply, float32 cast,
    truncation), also when its values are only 0.0 and 1.0. Otherwise the values must be (close to) whole numbers
    in [0, 255] — any integer array, or a float array of levels such as ``np.asarray(image, float)`` — and are
    truncated to uint8. transformers' ``to_pil_image`` asks "whole numbers?" first, so it reads a float array of
    0.0 and 1.0 as levels 0 and 1 of 255, nearly black (docs/parity.md).
    """
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.floating) and image.min() >= 0.0 and image.max() <= 1.0:
        return (image.astype(np.float64) * 255.0).astype(np.float32).astype(np.uint8)
    if np.allclose(image, image.astype(int)):
        if image.min() < 0 or image.max() > 255:
            raise ValueError(
                f"{name}: integer-valued pixels must lie in [0, 255], got values in [{image.min()}, {image.max()}]"
            )
        return image.astype(np.uint8)
    raise ValueError(
        f"{name}: float pixels must lie in [0, 1] (or be integers in [0, 255]), "
        f"got values in [{image.min()}, {image.max()}]"
    )


def to_rgb_uint8(image, name: str = "image", do_convert_rgb: bool = True) -> np.ndarray:
    """Any accepted image (PIL image, path, [H, W(, C)] array) → [H, W, 3] uint8.

    A float array with every value in [0, 1] holds intensities (×255), even one of only 0.0 and 1.0; other
    arrays hold levels 0…255. transformers would instead rescale a [0, 1] array twice (once back after its PIL
    round trip, once more in the rescale step), and reads one of only 0.0 and 1.0 as levels 0 and 1.
    """
    if isinstance(image, (str, Path)):
        image = open_image_file(image, name)
    if isinstance(image, PIL.Image.Image):
        _check_8_bit(image, name, f"the PIL image of size {image.size}")
        if not do_convert_rgb and image.mode != "RGB":
            raise ValueError(f"{name}: do_convert_rgb is off, so the image must be RGB, got {_describe(image)}")
        return _pil_to_rgb(image, name)
    if isinstance(image, np.ndarray):
        array = _check_array(image, name)
        if do_convert_rgb:
            array = _array_to_rgb(array, name)
        elif array.shape[2] != 3:
            raise ValueError(
                f"{name}: do_convert_rgb is off, so the array must have 3 channels, got {_describe(image)}"
            )
        return _array_to_uint8(array, name)
    raise ValueError(
        f"{name}: expected a PIL image, a path (str or pathlib.Path) or a uint8/float array of shape (H, W) or "
        f"(H, W, C), got {_describe(image)}"
    )


def load_image(image, name: str = "image") -> PIL.Image.Image:
    """The one image loader of kosmos2_ref: a path, a PIL image or an array -> the RGB PIL image the processor
    sees.

    Paths are opened fully and EXIF-rotated (:func:`open_image_file`); other images go through the processor's
    own conversion (:func:`to_rgb_uint8`): transparency composited onto white, grey repeated, float arrays in
    [0, 1] scaled by 255. What the processor refuses (16-bit images, empty or malformed arrays, NaN, values out of
    range, other types) raises a ValueError naming ``name``. An RGB PIL image is returned as it is (not copied).
    """
    if isinstance(image, (str, Path)):
        return open_image_file(image, name)
    if isinstance(image, PIL.Image.Image) and image.mode == "RGB":
        if image.width == 0 or image.height == 0:
            raise ValueError(f"{name}: the image is empty ({_describe(image)}); expected at least 1×1 pixels")
        return image
    return PIL.Image.fromarray(to_rgb_uint8(image, name))  # [H, W, 3] uint8 -> RGB image


# ------------------------------------------------------------------------------------------------- transforms
def resize(image: np.ndarray, height: int, width: int, resample: int = 3) -> np.ndarray:
    """[H, W, 3] uint8 → [height, width, 3] uint8 with Pillow (docs/numerics.md §12.3 describes its BICUBIC)."""
    resized = PIL.Image.fromarray(image).resize((width, height), resample=PIL.Image.Resampling(resample))
    return np.asarray(resized)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """[C, H, W] → [C, height, width], the central crop; an image smaller than the crop is zero-padded around
    (image_transforms.center_crop)."""
    _, h, w = image.shape
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return image[:, top : top + height, left : left + width]
    new_h, new_w = max(height, h), max(width, w)
    pad_top, pad_left = -(-(new_h - h) // 2), -(-(new_w - w) // 2)  # ceil of half the padding
    padded = np.zeros((image.shape[0], new_h, new_w), dtype=image.dtype)
    padded[:, pad_top : pad_top + h, pad_left : pad_left + w] = image
    top, left = top + pad_top, left + pad_left
    return padded[:, max(0, top) : min(new_h, top + height), max(0, left) : min(new_w, left + width)]


def rescale(image: np.ndarray, factor: float) -> np.ndarray:
    """image · factor computed in float64, then cast to float32 (image_transforms.rescale)."""
    return (image.astype(np.float64) * factor).astype(np.float32)


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
    """[C, H, W]: (image − mean_c) / std_c in float32 (image_transforms.normalize; integers are cast first)."""
    if not np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32)
    mean = np.asarray(mean, dtype=image.dtype)[:, None, None]  # [C, 1, 1]
    std = np.asarray(std, dtype=image.dtype)[:, None, None]
    return (image - mean) / std


def preprocess_image(image, config: ImageProcessorConfig, name: str = "image") -> np.ndarray:
    """One image → [3, H', W'] float32 (224×224 for Kosmos-2)."""
    array = to_rgb_uint8(image, name, config.do_convert_rgb)  # [H, W, 3] uint8
    if config.do_resize:
        height, width = config.resize_target(array.shape[0], array.shape[1])
        array = resize(array, height, width, config.resample)
    chw = np.ascontiguousarray(array.transpose(2, 0, 1))  # [H, W, 3] -> [3, H, W]
    if config.do_center_crop:
        chw = center_crop(chw, config.crop_size["height"], config.crop_size["width"])
    if config.do_rescale:
        chw = rescale(chw, config.rescale_factor)
    if config.do_normalize:
        chw = normalize(chw, config.image_mean, config.image_std)
    return chw.astype(np.float32, copy=False)


def as_image_list(images, name: str = "images") -> list:
    """A single image, a list/tuple of images or a [B, H, W, C] array → a list of single images."""
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError(f"{name}: got an empty list; expected at least one image")
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)  # [B, H, W, C] -> B × [H, W, C]
    return [images]


def preprocess_images(images, config: ImageProcessorConfig | None = None, name: str = "images") -> np.ndarray:
    """Images → pixel_values [B, 3, 224, 224] float32 (for the Kosmos-2 config)."""
    config = ImageProcessorConfig() if config is None else config
    items = as_image_list(images, name)
    arrays = [preprocess_image(img, config, f"{name}[{i}]" if len(items) > 1 else name) for i, img in enumerate(items)]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"{name}: the processed images differ in shape {sorted(shapes)}; set a fixed size")
    return np.stack(arrays)  # B × [3, H, W] -> [B, 3, H, W]
