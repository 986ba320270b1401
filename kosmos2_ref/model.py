"""``Kosmos2``: config + parameters + backend, and the user entry points (docs/api.md).

Mirrors ``Kosmos2ForConditionalGeneration`` in ``transformers/models/kosmos2/modeling_kosmos2.py``:
pixel_values -> vision tower -> connector -> image_embeds; input_ids (+ image_embeds) -> decoder -> logits.
Inputs are validated here, at the boundary, so the stage functions below never see a bad shape.
"""
from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backend import Backend, get_backend, get_xp, to_numpy
from .cache import KVCache
from .checks import is_int
from .config import ConfigError, Kosmos2Config
from .connector import image_to_text
from .files import file_present, read_text
from .primitives import reference_mode, resolve_reference
from .text import TextOutput, causal_lm_loss, text_forward
from .vision import VisionOutput, vision_forward
from .weights import STORAGE_DTYPES, load_flat, unflatten


@dataclass
class Kosmos2Output:
    """transformers' ``Kosmos2ForConditionalGenerationModelOutput`` fields, plus ``last_hidden_state``
    (the base ``Kosmos2Model`` output: the decoder's final-LN hidden states before the LM head)."""

    logits: object | None = None                  # [B, T, V]
    loss: object | None = None                    # 0-d, when labels were given
    last_hidden_state: object | None = None       # [B, T, C]
    past_key_values: KVCache | None = None
    hidden_states: tuple | None = None            # 25 × [B, T, C]
    attentions: tuple | None = None               # 24 × [B, H, T, past+T]
    image_embeds: object | None = None            # [B, 64, C]
    projection_attentions: object | None = None   # [B, H, 64, 257+64]
    vision_model_output: VisionOutput | None = None


def _as_array(name: str, a, expected: str):
    """``a`` itself when it is a NumPy array or a device array, else made into a host array (nested lists, a CPU
    torch tensor, ...); a ValueError naming ``name`` when it cannot be one (rows of different lengths)."""
    if type(a) is np.ndarray or get_xp(a) is not np:
        return a
    try:
        return np.asarray(a)
    except (ValueError, TypeError):
        raise ValueError(f"{name} must be an array of shape {expected}, got a {type(a).__name__} that does not "
                         f"make one (rows of different lengths?)") from None


def _float_array(name: str, a, expected: str):
    """A float array (array-likes converted, see :func:`_as_array`), or a ValueError naming ``name``."""
    a = _as_array(name, a, expected)
    if not np.issubdtype(np.dtype(a.dtype.name), np.floating):
        raise ValueError(f"{name} must be a float array of shape {expected}, got dtype {a.dtype}")
    return a


def _finite_float32(name: str, a, xp):
    """Float array ``a`` as float32 on ``xp``; a ValueError naming ``name`` when a host array holds NaN or ±inf.

    Why look: one NaN in an image or an embedding makes every logit NaN, and argmax over NaN is token 0, so
    ``generate`` would return token 0 at every step without a word. The look is taken on the host, where inputs
    arrive from: after the cast to float32 (float64 values beyond its range become inf there), before the upload,
    one pass per call and never per token. An array already on the device is taken as it is: looking would cost a
    device->host sync on every call, and in practice it is the model's own ``encode_image`` output.
    """
    if type(a) is not np.ndarray:
        return xp.asarray(a, dtype=xp.float32)
    with np.errstate(over="ignore"):          # an overflow becomes inf, which is refused just below
        a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        n = int((~np.isfinite(a)).sum())
        raise ValueError(f"{name} holds {n} non-finite value(s) (NaN or inf) among its {a.size}: expected finite "
                         f"numbers")
    return xp.asarray(a)


def _check_flags(**flags) -> None:
    """Switches must be True or False: a string such as "false" would otherwise count as True."""
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False, got {value!r}")


def _host_int_array(name: str, a, ndim: int = 2) -> np.ndarray:
    """A host integer array of ``ndim`` dims, or a ValueError naming ``name``."""
    try:
        a = np.asarray(to_numpy(a))      # nested lists of different lengths fail here
    except (ValueError, TypeError):
        raise ValueError(f"{name} must be an integer array of shape [batch, tokens], got a {type(a).__name__} "
                         f"that does not make one (rows of different lengths?)") from None
    if a.dtype == bool:
        a = a.astype(np.int64)
    if a.ndim != ndim or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be a {ndim}-D integer array, got shape {a.shape} and dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _on_own_primitives(method):
    """Run a model method on the model's primitives: the textbook ones with ``reference``, else the fast ones."""
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        with reference_mode(self.reference):
            return method(self, *args, **kwargs)
    return wrapped


_PROCESSOR_LOCK = threading.Lock()     # builds a model's processor once when threads ask for it together


class Kosmos2:
    """The KOSMOS-2 model in NumPy (or CuPy). Build it with :meth:`from_pretrained`.

    One model may be shared by threads: the parameters are only read, and every call makes its own cache and
    buffers (``fast``'s scratch buffers are per thread).

    ``reference=True`` runs every call on the textbook primitives of :mod:`kosmos2_ref.layers` instead of the
    fast ones of :mod:`kosmos2_ref.fast`; ``None`` reads ``$KOSMOS2_REFERENCE`` (:mod:`kosmos2_ref.primitives`).
    """

    def __init__(self, config: Kosmos2Config, params: dict, backend: Backend | str | None = None,
                 dtype: str = "float32", generation_config: dict | None = None, name_or_path: str | None = None,
                 reference: bool | None = None):
        self.reference = resolve_reference(reference)
        self.config = config
        self.params = params
        self.backend = get_backend(backend)
        self.xp = self.backend.xp
        self.dtype = dtype
        self.generation_config = dict(generation_config or {})
        self.name_or_path = name_or_path

    # ----------------------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_pretrained(cls, path: str | Path, backend: str | Backend | None = None, dtype: str = "float32",
                        reference: bool | None = None, **hub_kwargs) -> "Kosmos2":
        """Load ``config.json`` + ``model.safetensors`` or ``pytorch_model.bin`` (or shards) from a folder or a Hub id.

        ``backend`` is ``"numpy"`` (default) or ``"cupy"``, overridable with ``$KOSMOS2_BACKEND`` when not given;
        ``dtype`` is the storage dtype of the weight matrices (``"float32"``, ``"float16"``, ``"bfloat16"``);
        compute is float32 either way. ``reference=True`` runs on the textbook primitives (see :class:`Kosmos2`).
        """
        from .hub import resolve_checkpoint

        reference = resolve_reference(reference)        # refused before any file is read
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported: expected one of {STORAGE_DTYPES}")
        be = get_backend(backend)
        folder = resolve_checkpoint(path, **hub_kwargs)
        config = Kosmos2Config.from_pretrained(folder)
        flat = load_flat(folder, config, dtype)
        params = unflatten({k: be.to_device(v) for k, v in flat.items()})
        gen = {}
        gpath = folder / "generation_config.json"
        if file_present(gpath):
            text = read_text(gpath)
            try:
                gen = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{gpath}: not valid JSON ({exc})") from None
            if not isinstance(gen, dict):       # its settings are read by name (generation.py)
                raise ConfigError(f"{gpath}: expected a JSON object of generation settings, got a JSON "
                                  f"{type(gen).__name__}")
        model = cls(config, params, be, dtype, gen, str(path), reference)
        model.folder = folder        # where the files are (a Hub id resolves into the Hugging Face cache)
        return model

    # ----------------------------------------------------------------------------------------------------------
    # Image path

    def _pixel_values(self, pixel_values):
        if pixel_values is None:
            return None
        xp = self.xp
        pixel_values = _as_array("pixel_values", pixel_values, "[batch, 3, height, width]")
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.vision_config.num_channels:
            raise ValueError(f"pixel_values must have shape [batch, {self.config.vision_config.num_channels}, "
                             f"height, width], got {tuple(pixel_values.shape)}")
        if not np.issubdtype(np.dtype(pixel_values.dtype.name), np.floating):
            raise ValueError(f"pixel_values must be a float array (preprocessed by Kosmos2Processor), "
                             f"got dtype {pixel_values.dtype}")
        p = self.config.vision_config.patch_size
        if pixel_values.shape[2] < p or pixel_values.shape[3] < p:
            raise ValueError(f"pixel_values of size {pixel_values.shape[2]}x{pixel_values.shape[3]} is smaller than "
                             f"one {p}x{p} patch")
        return _finite_float32("pixel_values", pixel_values, xp)

    @_on_own_primitives
    def encode_image(self, pixel_values, *, output_hidden_states: bool = False, output_attentions: bool = False,
                     interpolate_pos_encoding: bool = False):
        """pixel_values [B, 3, H, W] -> (image_embeds [B, 64, C], projection_attentions, VisionOutput)."""
        _check_flags(output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                     interpolate_pos_encoding=interpolate_pos_encoding)
        pv = self._pixel_values(pixel_values)
        vc = self.config.vision_config
        vout = vision_forward(pv, self.params["vision_model"]["model"], vc,
                              output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                              interpolate_pos_encoding=interpolate_pos_encoding)
        embeds, probs = image_to_text(vout.last_hidden_state, self.params["vision_model"]["model"]["post_layernorm"],
                                      self.params["image_to_text_projection"],
                                      self.config.text_config.attention_heads, vc.layer_norm_eps)
        return embeds, probs, vout

    def get_image_features(self, pixel_values, interpolate_pos_encoding: bool = False):
        """The image embeddings the decoder reads: pixel_values [B, 3, H, W] -> [B, 64, 2048]."""
        return self.encode_image(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)[0]

    # ----------------------------------------------------------------------------------------------------------
    # Input checks shared by forward and generate

    def check_float_input(self, name: str, a):
        """An embedding the caller gives (``image_embeds`` or ``inputs_embeds``) as float32 on the backend: nested
        lists are accepted; a non-float dtype, NaN or ±inf raise a ValueError naming ``name``."""
        C = self.config.text_config.embed_dim
        rows = self.config.latent_query_num if name == "image_embeds" else "tokens"
        return _finite_float32(name, _float_array(name, a, f"[batch, {rows}, {C}]"), self.xp)

    def check_text_inputs(self, input_ids=None, attention_mask=None, image_embeds_position_mask=None,
                          image_embeds=None, labels=None, position_ids=None, inputs_embeds=None, past_length=0):
        """Validate the text-side inputs; return them as host int64 arrays (image_embeds on the device)."""
        tc = self.config.text_config
        if input_ids is None and inputs_embeds is None:
            raise ValueError("input_ids is required (or inputs_embeds)")
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("pass either input_ids or inputs_embeds, not both")
        if input_ids is not None:
            input_ids = _host_int_array("input_ids", input_ids)
            B, T = input_ids.shape
            if T == 0 or B == 0:
                raise ValueError(f"input_ids is empty (shape {input_ids.shape}); expected at least one token")
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= tc.vocab_size:
                raise ValueError(f"input_ids holds ids outside [0, {tc.vocab_size - 1}] (min {lo}, max {hi})")
        else:
            inputs_embeds = _float_array("inputs_embeds", inputs_embeds, f"[batch, tokens, {tc.embed_dim}]")
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != tc.embed_dim:
                raise ValueError(f"inputs_embeds must have shape [batch, tokens, {tc.embed_dim}], "
                                 f"got {tuple(inputs_embeds.shape)}")
            B, T = inputs_embeds.shape[:2]
        if attention_mask is not None:
            attention_mask = _host_int_array("attention_mask", attention_mask)
            if attention_mask.shape != (B, past_length + T):
                raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected {(B, past_length + T)} "
                                 f"(batch, cached + new tokens)")
            if not np.isin(attention_mask, (0, 1)).all():
                raise ValueError("attention_mask must hold only 0 and 1")
        if position_ids is not None:
            position_ids = _host_int_array("position_ids", position_ids)
            if position_ids.shape != (B, T):
                raise ValueError(f"position_ids has shape {position_ids.shape}, expected {(B, T)}")
            if position_ids.min() < 0:
                raise ValueError("position_ids must be non-negative")
        if labels is not None:
            labels = _host_int_array("labels", labels)
            if labels.shape != (B, T):
                raise ValueError(f"labels has shape {labels.shape}, expected {(B, T)} like input_ids")
            bad = (labels != -100) & ((labels < 0) | (labels >= tc.vocab_size))
            if bad.any():
                raise ValueError(f"labels holds values outside [0, {tc.vocab_size - 1}] that are not -100")
        if image_embeds is not None and past_length == 0:
            Q = self.config.latent_query_num
            image_embeds = _float_array("image_embeds", image_embeds, f"[{B}, {Q}, {tc.embed_dim}]")
            if image_embeds.ndim != 3 or tuple(image_embeds.shape) != (B, Q, tc.embed_dim):
                raise ValueError(f"image_embeds must have shape [{B}, {Q}, {tc.embed_dim}], "
                                 f"got {tuple(image_embeds.shape)}")
            if image_embeds_position_mask is None:
                raise ValueError("image_embeds_position_mask is required with an image: it marks the "
                                 f"{image_embeds.shape[1]} positions where the image embeddings go")
            image_embeds_position_mask = _host_int_array("image_embeds_position_mask", image_embeds_position_mask)
            if image_embeds_position_mask.shape != (B, T):
                raise ValueError(f"image_embeds_position_mask has shape {image_embeds_position_mask.shape}, "
                                 f"expected {(B, T)} like input_ids")
            counts = (image_embeds_position_mask != 0).sum(axis=1)
            if (counts != image_embeds.shape[1]).any():
                raise ValueError(f"image_embeds_position_mask marks {counts.tolist()} image positions per row, but "
                                 f"each row needs exactly {image_embeds.shape[1]} (latent_query_num)")
            image_embeds = self.xp.asarray(image_embeds, dtype=self.xp.float32)
        return input_ids, attention_mask, image_embeds_position_mask, image_embeds, labels, position_ids

    # ----------------------------------------------------------------------------------------------------------
    # Forward

    @_on_own_primitives
    def forward(self, pixel_values=None, input_ids=None, attention_mask=None, image_embeds_position_mask=None,
                image_embeds=None, labels=None, position_ids=None, past_key_values: KVCache | None = None,
                inputs_embeds=None, output_hidden_states: bool = False, output_attentions: bool = False,
                interpolate_pos_encoding: bool = False, compute_logits: bool = True,
                logits_to_keep: int = 0) -> Kosmos2Output:
        """The full model: image (pixel_values, or precomputed image_embeds) and text -> logits.

        Give a :class:`KVCache` as ``past_key_values`` to append to it (see :meth:`new_cache`); after the first
        step the image inputs are not needed. ``compute_logits=False`` stops before the LM head and returns the
        base model's ``last_hidden_state`` only. ``logits_to_keep`` = k > 0 computes logits for the last k
        positions only; 0 keeps them all.
        """
        _check_flags(output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                     interpolate_pos_encoding=interpolate_pos_encoding, compute_logits=compute_logits)
        k = logits_to_keep
        if not is_int(k) or k < 0:
            raise ValueError(f"logits_to_keep must be an integer >= 0 (0 keeps every position), got {k!r}")
        past = past_key_values.length if past_key_values is not None else 0
        if image_embeds is not None and past == 0:            # lists accepted, NaN/inf refused
            image_embeds = self.check_float_input("image_embeds", image_embeds)
        if inputs_embeds is not None:
            inputs_embeds = self.check_float_input("inputs_embeds", inputs_embeds)
        if image_embeds is None and pixel_values is None and past == 0:
            raise ValueError("You have to specify either pixel_values or image_embeds")
        vout = probs = None
        if image_embeds is None and pixel_values is not None and past == 0:
            image_embeds, probs, vout = self.encode_image(
                pixel_values, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                interpolate_pos_encoding=interpolate_pos_encoding)
        (input_ids, attention_mask, image_embeds_position_mask, image_embeds_checked, labels,
         position_ids) = self.check_text_inputs(input_ids, attention_mask, image_embeds_position_mask,
                                                image_embeds, labels, position_ids, inputs_embeds, past)
        if past_key_values is not None and past_key_values.batch_size != (
                input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0]):
            raise ValueError(f"past_key_values holds batch {past_key_values.batch_size}, inputs have another")
        out: TextOutput = text_forward(
            self.params["text_model"], self.config.text_config, self.xp, input_ids=input_ids,
            inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            image_embeds=image_embeds_checked if past == 0 else None,
            image_embeds_position_mask=image_embeds_position_mask, position_ids=position_ids,
            cache=past_key_values, output_hidden_states=output_hidden_states,
            output_attentions=output_attentions, compute_logits=compute_logits or labels is not None,
            logits_to_keep=0 if labels is not None else logits_to_keep)
        loss = causal_lm_loss(out.logits, labels, self.xp) if labels is not None else None
        return Kosmos2Output(logits=out.logits, loss=loss, last_hidden_state=out.last_hidden_state,
                             past_key_values=past_key_values, hidden_states=out.hidden_states,
                             attentions=out.attentions, image_embeds=image_embeds,
                             projection_attentions=probs, vision_model_output=vout)

    __call__ = forward

    def generate(self, *args, **kwargs):
        """Decode new tokens after the prompt with a KV cache: see :func:`kosmos2_ref.generation.generate`."""
        from .generation import generate

        return generate(self, *args, **kwargs)

    # ----------------------------------------------------------------------------------------------------------
    # Task conveniences (kosmos2_ref.tasks)

    @property
    def processor(self):
        """The checkpoint's ``Kosmos2Processor``, built on first use from the model folder (its tokenizer and
        preprocessor files; the packaged real tokenizer where the folder has none)."""
        if getattr(self, "_processor", None) is None:
            from .tasks import processor_for

            with _PROCESSOR_LOCK:
                if getattr(self, "_processor", None) is None:
                    self._processor = processor_for(self)
        return self._processor

    @processor.setter
    def processor(self, value):
        self._processor = value

    def caption(self, image, prompt: str = "<grounding> An image of", processor=None, **kwargs):
        """A grounded caption of ``image`` (path, PIL image or uint8 array): :func:`kosmos2_ref.tasks.caption`."""
        from .tasks import caption

        return caption(self, processor, image, prompt=prompt, **kwargs)

    def ground(self, image, phrase: str, processor=None, **kwargs):
        """The boxes of ``phrase`` in ``image``: :func:`kosmos2_ref.tasks.ground`."""
        from .tasks import ground

        return ground(self, processor, image, phrase, **kwargs)

    def describe(self, image, box, processor=None, **kwargs):
        """What is inside ``box`` (normalised, or pixels): :func:`kosmos2_ref.tasks.describe`."""
        from .tasks import describe

        return describe(self, processor, image, box, **kwargs)

    def embed(self, images, processor=None, **kwargs):
        """Image embeddings [N, 64, C] and pooled CLIP vectors [N, 1024]: :func:`kosmos2_ref.tasks.embed`."""
        from .tasks import embed

        return embed(self, processor, images, **kwargs)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty KV cache for ``batch`` rows and up to ``capacity`` tokens (it grows if exceeded)."""
        for name, v in (("batch", batch), ("capacity", capacity)):
            if not is_int(v) or v < 1:
                raise ValueError(f"new_cache: {name} must be a positive integer, got {v!r}")
        tc = self.config.text_config
        return KVCache(tc.layers, batch, tc.attention_heads, tc.head_dim, capacity, self.xp)

    def num_parameters(self) -> int:
        """Unique parameters (the tied LM head counted once): 1,664,485,376 for the released config."""
        from .weights import expected_shapes
        import math

        return sum(math.prod(s) for s in expected_shapes(self.config).values())

    def __repr__(self) -> str:
        return (f"Kosmos2({self.name_or_path!r}, backend={self.backend.name!r}, dtype={self.dtype!r}, "
                f"params={self.num_parameters():,}{', reference=True' if self.reference else ''})")
