"""The input checks at the library's boundary: each public call runs them once, on what the caller gave.

Every check raises a ValueError naming the input, what was wrong and what was expected; what passes comes back in
the form the stage functions take (host int64 ids and masks; float32 embeddings on the backend), so nothing past
the boundary looks at a shape again, and the decoding loop's steps (:meth:`kosmos2_ref.model.Kosmos2.decode_step`)
look at nothing.

Python's bool is a subclass of int (and JSON's true arrives as True), so ``isinstance(True, int)`` holds: a flag
passed where a count or an id is expected would otherwise be taken as 1. NumPy's scalars count as numbers here
(``numbers.Integral`` / ``numbers.Real`` include them); ``np.bool_`` does not.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from .backend import get_xp, to_numpy


def is_int(v) -> bool:
    """An integer, Python's or NumPy's, and not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v) -> bool:
    """A real number (integer or float), Python's or NumPy's, and not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


# ==============================================================================================================
# Arrays


def as_array(name: str, a, expected: str):
    """``a`` itself when it is a NumPy array or a device array, else made into a host array (nested lists, a CPU
    torch tensor, ...); a ValueError naming ``name`` when it cannot be one (rows of different lengths)."""
    if type(a) is np.ndarray or get_xp(a) is not np:
        return a
    try:
        return np.asarray(a)
    except (ValueError, TypeError):
        raise ValueError(
            f"{name} must be an array of shape {expected}, got a {type(a).__name__} that does not "
            f"make one (rows of different lengths?)"
        ) from None


def float_array(name: str, a, expected: str):
    """A float array (array-likes converted, see :func:`as_array`), or a ValueError naming ``name``."""
    a = as_array(name, a, expected)
    if not np.issubdtype(np.dtype(a.dtype.name), np.floating):
        raise ValueError(f"{name} must be a float array of shape {expected}, got dtype {a.dtype}")
    return a


def finite_float32(name: str, a, xp):
    """Float array ``a`` as float32 on ``xp``; a ValueError naming ``name`` when a host array holds NaN or ±inf.

    Why look: one NaN in an image or an embedding makes every logit NaN, and argmax over NaN is token 0, so
    ``generate`` would return token 0 at every step without a word. The look is taken on the host, where inputs
    arrive from: after the cast to float32 (float64 values beyond its range become inf there), before the upload,
    one pass per call and never per token. An array already on the device is taken as it is: looking would cost a
    device->host sync on every call, and in practice it is the model's own ``encode_image`` output.
    """
    if type(a) is not np.ndarray:
        return xp.asarray(a, dtype=xp.float32)
    with np.errstate(over="ignore"):  # an overflow becomes inf, which is refused just below
        a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        n = int((~np.isfinite(a)).sum())
        raise ValueError(
            f"{name} holds {n} non-finite value(s) (NaN or inf) among its {a.size}: expected finite numbers"
        )
    return xp.asarray(a)


def host_int_array(name: str, a, ndim: int = 2) -> np.ndarray:
    """A host int64 array of ``ndim`` dims (bools become 0/1), or a ValueError naming ``name``."""
    try:
        a = np.asarray(to_numpy(a))  # nested lists of different lengths fail here
    except (ValueError, TypeError):
        raise ValueError(
            f"{name} must be an integer array of shape [batch, tokens], got a {type(a).__name__} "
            f"that does not make one (rows of different lengths?)"
        ) from None
    if a.dtype == bool:
        a = a.astype(np.int64)
    if a.ndim != ndim or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be a {ndim}-D integer array, got shape {a.shape} and dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def check_flags(**flags) -> None:
    """Switches must be True or False: a string such as "false" would otherwise count as True."""
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False, got {value!r}")


# ==============================================================================================================
# The model's inputs (``config`` is a Kosmos2Config; ``xp`` the backend's array module)


def check_pixel_values(config, pixel_values, xp, batch: int | None = None):
    """pixel_values [B, 3, H, W] (array-likes accepted) as finite float32 on ``xp``; B must be ``batch`` when
    given (the rows of the prompt)."""
    vc = config.vision_config
    pixel_values = as_array("pixel_values", pixel_values, "[batch, 3, height, width]")
    if pixel_values.ndim != 4 or pixel_values.shape[1] != vc.num_channels:
        raise ValueError(
            f"pixel_values must have shape [batch, {vc.num_channels}, height, width], got {tuple(pixel_values.shape)}"
        )
    if batch is not None and pixel_values.shape[0] != batch:
        raise ValueError(
            f"pixel_values holds {pixel_values.shape[0]} images but input_ids has {batch} rows: the "
            f"batch sizes must agree"
        )
    if not np.issubdtype(np.dtype(pixel_values.dtype.name), np.floating):
        raise ValueError(
            f"pixel_values must be a float array (preprocessed by Kosmos2Processor), got dtype {pixel_values.dtype}"
        )
    p = vc.patch_size
    if pixel_values.shape[2] < p or pixel_values.shape[3] < p:
        raise ValueError(
            f"pixel_values of size {pixel_values.shape[2]}x{pixel_values.shape[3]} is smaller than one {p}x{p} patch"
        )
    return finite_float32("pixel_values", pixel_values, xp)


def check_float_input(config, name: str, a, xp):
    """An embedding the caller gives (``image_embeds`` [B, Q, C] or ``inputs_embeds`` [B, T, C]) as float32 on
    ``xp``: nested lists are accepted; a non-float dtype, NaN or ±inf raise a ValueError naming ``name``."""
    C = config.text_config.embed_dim
    rows = config.latent_query_num if name == "image_embeds" else "tokens"
    return finite_float32(name, float_array(name, a, f"[batch, {rows}, {C}]"), xp)


@dataclass
class TextInputs:
    """The text side of one call, checked: ids and masks as host int64 [B, T] (attention [B, past + T])."""

    input_ids: np.ndarray | None
    attention_mask: np.ndarray | None
    image_embeds_position_mask: np.ndarray | None
    image_embeds: object | None  # [B, Q, C] float32 on the backend
    labels: np.ndarray | None
    position_ids: np.ndarray | None
    inputs_embeds: object | None  # [B, T, C]


def check_token_ids(config, input_ids=None, inputs_embeds=None):
    """Exactly one of input_ids [B, T] (ids in the vocabulary) and inputs_embeds [B, T, C]; -> (ids, embeds, B, T)."""
    tc = config.text_config
    if input_ids is None and inputs_embeds is None:
        raise ValueError("input_ids is required (or inputs_embeds)")
    if input_ids is not None and inputs_embeds is not None:
        raise ValueError("pass either input_ids or inputs_embeds, not both")
    if inputs_embeds is not None:
        inputs_embeds = float_array("inputs_embeds", inputs_embeds, f"[batch, tokens, {tc.embed_dim}]")
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != tc.embed_dim:
            raise ValueError(
                f"inputs_embeds must have shape [batch, tokens, {tc.embed_dim}], got {tuple(inputs_embeds.shape)}"
            )
        return None, inputs_embeds, *inputs_embeds.shape[:2]
    input_ids = host_int_array("input_ids", input_ids)
    B, T = input_ids.shape
    if T == 0 or B == 0:
        raise ValueError(f"input_ids is empty (shape {input_ids.shape}); expected at least one token")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= tc.vocab_size:
        raise ValueError(f"input_ids holds ids outside [0, {tc.vocab_size - 1}] (min {lo}, max {hi})")
    return input_ids, None, B, T


def check_attention_mask(attention_mask, B: int, T: int, past_length: int = 0):
    """None, or a 0/1 mask [B, past_length + T] (cached tokens, then new ones) as host int64."""
    if attention_mask is None:
        return None
    attention_mask = host_int_array("attention_mask", attention_mask)
    if attention_mask.shape != (B, past_length + T):
        raise ValueError(
            f"attention_mask has shape {attention_mask.shape}, expected {(B, past_length + T)} "
            f"(batch, cached + new tokens)"
        )
    if not np.isin(attention_mask, (0, 1)).all():
        raise ValueError("attention_mask must hold only 0 and 1")
    return attention_mask


def check_position_ids(position_ids, B: int, T: int):
    """None, or non-negative position ids [B, T] as host int64."""
    if position_ids is None:
        return None
    position_ids = host_int_array("position_ids", position_ids)
    if position_ids.shape != (B, T):
        raise ValueError(f"position_ids has shape {position_ids.shape}, expected {(B, T)}")
    if position_ids.min() < 0:
        raise ValueError("position_ids must be non-negative")
    return position_ids


def check_labels(config, labels, B: int, T: int):
    """None, or labels [B, T] holding vocabulary ids or -100 (ignored), as host int64."""
    if labels is None:
        return None
    vocab = config.text_config.vocab_size
    labels = host_int_array("labels", labels)
    if labels.shape != (B, T):
        raise ValueError(f"labels has shape {labels.shape}, expected {(B, T)} like input_ids")
    if ((labels != -100) & ((labels < 0) | (labels >= vocab))).any():
        raise ValueError(f"labels holds values outside [0, {vocab - 1}] that are not -100")
    return labels


def check_image_slots(config, image_embeds_position_mask, B: int, T: int) -> np.ndarray:
    """image_embeds_position_mask [B, T] marking exactly latent_query_num image slots per row, as host int64."""
    Q = config.latent_query_num
    if image_embeds_position_mask is None:
        raise ValueError(
            f"image_embeds_position_mask is required with an image: it marks the {Q} positions where "
            f"the image embeddings go"
        )
    mask = host_int_array("image_embeds_position_mask", image_embeds_position_mask)
    if mask.shape != (B, T):
        raise ValueError(f"image_embeds_position_mask has shape {mask.shape}, expected {(B, T)} like input_ids")
    counts = (mask != 0).sum(axis=1)
    if (counts != Q).any():
        raise ValueError(
            f"image_embeds_position_mask marks {counts.tolist()} image positions per row, but each "
            f"row needs exactly {Q} (latent_query_num)"
        )
    return mask


def check_image_embeds(config, image_embeds, B: int, xp):
    """image_embeds [B, Q, C] (array-likes accepted) as float32 on ``xp``."""
    tc, Q = config.text_config, config.latent_query_num
    image_embeds = float_array("image_embeds", image_embeds, f"[{B}, {Q}, {tc.embed_dim}]")
    if image_embeds.ndim != 3 or tuple(image_embeds.shape) != (B, Q, tc.embed_dim):
        raise ValueError(f"image_embeds must have shape [{B}, {Q}, {tc.embed_dim}], got {tuple(image_embeds.shape)}")
    return xp.asarray(image_embeds, dtype=xp.float32)


def check_text_inputs(
    config,
    xp,
    input_ids=None,
    attention_mask=None,
    image_embeds_position_mask=None,
    image_embeds=None,
    labels=None,
    position_ids=None,
    inputs_embeds=None,
    past_length: int = 0,
) -> TextInputs:
    """Validate the text-side inputs of one call (``past_length`` tokens already cached); an image
    (``image_embeds``) needs its slots (``image_embeds_position_mask``), which are read only with it."""
    input_ids, inputs_embeds, B, T = check_token_ids(config, input_ids, inputs_embeds)
    attention_mask = check_attention_mask(attention_mask, B, T, past_length)
    position_ids = check_position_ids(position_ids, B, T)
    labels = check_labels(config, labels, B, T)
    image_slots = None
    if image_embeds is not None:
        image_embeds = check_image_embeds(config, image_embeds, B, xp)
        image_slots = check_image_slots(config, image_embeds_position_mask, B, T)
    return TextInputs(input_ids, attention_mask, image_slots, image_embeds, labels, position_ids, inputs_embeds)
