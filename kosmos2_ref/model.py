"""``Kosmos2``: config + parameters + backend, and the forward pass (docs/api.md); the tasks are in ``tasks.py``.

Mirrors ``Kosmos2ForConditionalGeneration`` in ``transformers/models/kosmos2/modeling_kosmos2.py``:
pixel_values -> vision tower -> connector -> image_embeds; input_ids (+ image_embeds) -> decoder -> logits.
Inputs are validated at the boundary, once per public call (:mod:`kosmos2_ref.checks`), so the stage functions
never see a bad shape; :meth:`Kosmos2.decode_step` is the unchecked step a decoding loop calls
(:mod:`kosmos2_ref.generation`, which depends on this module, never the other way).
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .backend import Backend, get_backend
from .cache import KVCache
from .checks import TextInputs, check_flags, check_float_input, check_pixel_values, check_text_inputs, is_int
from .config import ConfigError, Kosmos2Config
from .connector import image_to_text
from .decoder import TextOutput, causal_lm_loss, text_forward
from .files import file_present, read_text
from .hub import resolve_checkpoint
from .primitives import reference_mode, resolve_reference
from .vision import VisionOutput, vision_forward
from .weights import STORAGE_DTYPES, expected_shapes, load_flat, unflatten


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


# Methods that left the class so that the model depends on nothing built on it, and where they went:
# Kosmos2.__getattr__ names the new place.
MOVED = {
    "generate": "kosmos2_ref.generate(model, ...)",
    "caption": "kosmos2_ref.tasks.caption(model, image, ...)",
    "ground": "kosmos2_ref.tasks.ground(model, image, phrase, ...)",
    "describe": "kosmos2_ref.tasks.describe(model, image, box, ...)",
    "embed": "kosmos2_ref.tasks.embed(model, images, ...)",
    "processor": "kosmos2_ref.tasks.model_processor(model)",
}


def _on_own_primitives(method):
    """Run a model method on the model's primitives: the textbook ones with ``reference``, else the fast ones."""
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        with reference_mode(self.reference):
            return method(self, *args, **kwargs)
    return wrapped




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

    def __getattr__(self, name: str):
        """Called only for attributes the model lacks: a method that moved out of the class says where to."""
        if name in MOVED:
            raise AttributeError(f"Kosmos2.{name} has moved: use {MOVED[name]}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

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
            if not isinstance(gen, dict):       # its settings are read by name (kosmos2_ref.generation)
                raise ConfigError(f"{gpath}: expected a JSON object of generation settings, got a JSON "
                                  f"{type(gen).__name__}")
        model = cls(config, params, be, dtype, gen, str(path), reference)
        model.folder = folder        # where the files are (a Hub id resolves into the Hugging Face cache)
        return model

    # ----------------------------------------------------------------------------------------------------------
    # Image path

    @_on_own_primitives
    def encode_image(self, pixel_values, *, output_hidden_states: bool = False, output_attentions: bool = False,
                     interpolate_pos_encoding: bool = False):
        """pixel_values [B, 3, H, W] -> (image_embeds [B, 64, C], projection_attentions, VisionOutput)."""
        check_flags(output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                    interpolate_pos_encoding=interpolate_pos_encoding)
        pv = check_pixel_values(self.config, pixel_values, self.xp)
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
    # Forward

    @_on_own_primitives
    def forward(self, pixel_values=None, input_ids=None, attention_mask=None, image_embeds_position_mask=None,
                image_embeds=None, labels=None, position_ids=None, past_key_values: KVCache | None = None,
                inputs_embeds=None, output_hidden_states: bool = False, output_attentions: bool = False,
                interpolate_pos_encoding: bool = False, compute_logits: bool = True,
                logits_to_keep: int = 0) -> Kosmos2Output:
        """The full model: image (pixel_values, or precomputed image_embeds) and text -> logits.

        Give a :class:`KVCache` as ``past_key_values`` to append to it (see :meth:`new_cache`); after the first
        step the image inputs are not needed (and not read). ``compute_logits=False`` stops before the LM head and
        returns the base model's ``last_hidden_state`` only. ``logits_to_keep`` = k > 0 computes logits for the
        last k positions only; 0 keeps them all.
        """
        check_flags(output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                    interpolate_pos_encoding=interpolate_pos_encoding, compute_logits=compute_logits)
        if not is_int(logits_to_keep) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an integer >= 0 (0 keeps every position), got "
                             f"{logits_to_keep!r}")
        past = past_key_values.length if past_key_values is not None else 0
        probs = vout = None
        if past > 0:                        # a cached step: the image's rows are in the cache already
            image_embeds = None
        elif image_embeds is not None:      # lists accepted, NaN/inf refused
            image_embeds = check_float_input(self.config, "image_embeds", image_embeds, self.xp)
        elif pixel_values is not None:
            image_embeds, probs, vout = self.encode_image(
                pixel_values, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                interpolate_pos_encoding=interpolate_pos_encoding)
        else:
            raise ValueError("You have to specify either pixel_values or image_embeds")
        if inputs_embeds is not None:
            inputs_embeds = check_float_input(self.config, "inputs_embeds", inputs_embeds, self.xp)
        text = check_text_inputs(self.config, self.xp, input_ids, attention_mask, image_embeds_position_mask,
                                 image_embeds, labels, position_ids, inputs_embeds, past)
        batch = len(text.input_ids if text.input_ids is not None else text.inputs_embeds)
        if past_key_values is not None and past_key_values.batch_size != batch:
            raise ValueError(f"past_key_values holds {past_key_values.batch_size} rows but the inputs have {batch}: "
                             f"expected the batch the cache was made for")
        out = self._text_model(text, past_key_values, output_hidden_states, output_attentions,
                               compute_logits, logits_to_keep)
        out.projection_attentions, out.vision_model_output = probs, vout
        return out

    __call__ = forward

    def _text_model(self, text: TextInputs, cache, output_hidden_states: bool, output_attentions: bool,
                    compute_logits: bool, logits_to_keep: int) -> Kosmos2Output:
        """The decoder (and the loss, with labels) on checked inputs."""
        labels = text.labels
        out: TextOutput = text_forward(
            self.params["text_model"], self.config.text_config, self.xp, input_ids=text.input_ids,
            inputs_embeds=text.inputs_embeds, attention_mask=text.attention_mask, image_embeds=text.image_embeds,
            image_embeds_position_mask=text.image_embeds_position_mask, position_ids=text.position_ids,
            cache=cache, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            compute_logits=compute_logits or labels is not None,
            logits_to_keep=0 if labels is not None else logits_to_keep)
        loss = causal_lm_loss(out.logits, labels, self.xp) if labels is not None else None
        return Kosmos2Output(logits=out.logits, loss=loss, last_hidden_state=out.last_hidden_state,
                             past_key_values=cache, hidden_states=out.hidden_states, attentions=out.attentions,
                             image_embeds=text.image_embeds)

    @_on_own_primitives
    def decode_step(self, input_ids, cache: KVCache, attention_mask=None, position_ids=None, image_embeds=None,
                    image_embeds_position_mask=None):
        """One call of a decoding loop, **unchecked**: ids [N, T] appended to ``cache`` -> the last position's
        logits [N, V].

        The inputs must already be what :func:`kosmos2_ref.checks.check_text_inputs` returns (host int64 ids
        and masks, attention [N, cache.length + T], positions [N, T] or None for the pad-aware default, image
        embeddings [N, Q, C] float32 on the backend with their slots on the first call only): the loop checks its
        inputs once, at its own boundary, and then each token costs no look at the whole sequence again.
        """
        out = text_forward(self.params["text_model"], self.config.text_config, self.xp, input_ids=input_ids,
                           attention_mask=attention_mask, image_embeds=image_embeds,
                           image_embeds_position_mask=image_embeds_position_mask, position_ids=position_ids,
                           cache=cache, logits_to_keep=1)
        return out.logits[:, -1]                                                   # [N, V]

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty KV cache for ``batch`` rows and up to ``capacity`` tokens (it grows if exceeded)."""
        for name, v in (("batch", batch), ("capacity", capacity)):
            if not is_int(v) or v < 1:
                raise ValueError(f"new_cache: {name} must be a positive integer, got {v!r}")
        tc = self.config.text_config
        return KVCache(tc.layers, batch, tc.attention_heads, tc.head_dim, capacity, self.xp)

    def num_parameters(self) -> int:
        """Unique parameters (the tied LM head counted once): 1,664,485,376 for the released config."""
        return sum(math.prod(s) for s in expected_shapes(self.config).values())

    def __repr__(self) -> str:
        return (f"Kosmos2({self.name_or_path!r}, backend={self.backend.name!r}, dtype={self.dtype!r}, "
                f"params={self.num_parameters():,}{', reference=True' if self.reference else ''})")
