"""Model configuration, read from a Hugging Face ``config.json``.

Mirrors ``transformers/models/kosmos2/configuration_kosmos2.py`` (docs/numerics.md §2). Defaults equal
``microsoft/kosmos-2-patch14-224``. Keys we do not model are kept in ``extra`` (not fatal), so generation keys
such as ``text_config.no_repeat_ngram_size`` stay available to :mod:`kosmos2_ref.generation`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .checks import is_int, is_real
from .files import file_present, read_text


class ConfigError(ValueError):
    """A config.json that cannot describe a Kosmos-2 model."""


def _build(cls, d: dict, aliases: dict[str, str], where: str):
    """Construct dataclass ``cls`` from dict ``d``: known keys as fields, alias keys renamed, the rest in extra."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
    names = {f.name for f in fields(cls)} - {"extra"}
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in d.items():
        key2 = aliases.get(key, key)
        if key2 in names:
            if key2 in kwargs and key != key2:  # the canonical name wins over its alias
                continue
            kwargs[key2] = value
        else:
            extra[key] = value
    try:
        return cls(**kwargs, extra=extra)
    except ConfigError:
        raise  # it names its key already ("text_config.layer_norm_eps ...")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


# The checks below cover the keys our code reads. JSON gives us strings, nulls and negative numbers as readily as
# the right thing, and each of those fails far from here (a NumPy type error at the first forward) or not at all (a
# negative eps gives NaN logits, the string "false" is truthy, an out-of-range pad id shifts every position), so
# each is refused at load, naming the key. Keys we only carry along (dropout rates, dtype names, ...) are not checked.


def _check_positive_ints(obj, names, where):
    for n in names:
        v = getattr(obj, n)
        if not is_int(v) or v < 1:
            raise ConfigError(f"{where}.{n} must be a positive integer, got {v!r}")


def _check_eps(obj, where):
    """LayerNorm's eps: a positive finite number (0 divides by zero on a constant row, < 0 takes sqrt of < 0)."""
    v = obj.layer_norm_eps
    if not is_real(v) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{where}.layer_norm_eps must be a positive finite number (like 1e-05), got {v!r}")


def _check_flags(obj, names, where):
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, bool):
            raise ConfigError(f"{where}.{n} must be true or false (a JSON boolean), got {v!r}")


def _check_token_id(v, name, vocab_size, where, optional: bool):
    """A token id indexes the embedding table: an integer in [0, vocab_size); null where ``optional``."""
    if v is None and optional:
        return
    if not is_int(v) or not 0 <= v < vocab_size:
        also = " or null" if optional else ""
        raise ConfigError(
            f"{where}.{name} must be a token id, an integer in [0, {vocab_size - 1}] "
            f"(below vocab_size){also}, got {v!r}"
        )


@dataclass(frozen=True)
class VisionConfig:
    """The CLIP ViT-L/14 tower (docs/numerics.md §2)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        _check_positive_ints(
            self,
            [
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_channels",
                "image_size",
                "patch_size",
            ],
            "vision_config",
        )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vision_config.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"vision_config.hidden_act={self.hidden_act!r}: expected 'quick_gelu' or 'gelu'")
        _check_eps(self, "vision_config")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        return _build(cls, d, {}, "vision_config")


@dataclass(frozen=True)
class TextConfig:
    """The 24-layer causal decoder (docs/numerics.md §2)."""

    vocab_size: int = 65037
    max_position_embeddings: int = 2048
    embed_dim: int = 2048
    layers: int = 24
    ffn_dim: int = 8192
    attention_heads: int = 32
    activation_function: str = "gelu"
    layer_norm_eps: float = 1e-5
    scale_embedding: bool = True
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        _check_positive_ints(
            self,
            ["vocab_size", "max_position_embeddings", "embed_dim", "layers", "ffn_dim", "attention_heads"],
            "text_config",
        )
        if self.embed_dim % self.attention_heads:
            raise ConfigError(
                f"text_config.embed_dim={self.embed_dim} is not divisible by attention_heads={self.attention_heads}"
            )
        if self.activation_function not in ("gelu", "quick_gelu"):
            raise ConfigError(f"text_config.activation_function={self.activation_function!r}: expected 'gelu'")
        _check_eps(self, "text_config")
        _check_flags(self, ["scale_embedding", "use_cache", "tie_word_embeddings"], "text_config")
        # pad_token_id is also the padding index of the sinusoidal positions, so it must be a real id
        # (docs/numerics.md §6.2)
        _check_token_id(self.pad_token_id, "pad_token_id", self.vocab_size, "text_config", optional=False)
        _check_token_id(self.bos_token_id, "bos_token_id", self.vocab_size, "text_config", optional=True)
        several = isinstance(self.eos_token_id, list)  # generation accepts one id or a list
        for e in self.eos_token_id if several else [self.eos_token_id]:
            _check_token_id(e, "eos_token_id", self.vocab_size, "text_config", optional=not several)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.attention_heads

    # transformers' attribute_map aliases, so either name reads
    hidden_size = property(lambda self: self.embed_dim)
    num_hidden_layers = property(lambda self: self.layers)
    num_attention_heads = property(lambda self: self.attention_heads)

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        return _build(
            cls,
            d,
            {"hidden_size": "embed_dim", "num_hidden_layers": "layers", "num_attention_heads": "attention_heads"},
            "text_config",
        )


@dataclass(frozen=True)
class Kosmos2Config:
    """The whole model: text decoder, vision tower and the 64 latent queries of the connector
    (docs/numerics.md §2)."""

    text_config: TextConfig = field(default_factory=TextConfig)
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    latent_query_num: int = 64
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        _check_positive_ints(self, ["latent_query_num"], "config")

    @classmethod
    def from_dict(cls, d: dict) -> "Kosmos2Config":
        if not isinstance(d, dict):
            raise ConfigError(f"config: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        text = TextConfig.from_dict(d.pop("text_config", None) or {})
        vision = VisionConfig.from_dict(d.pop("vision_config", None) or {})
        lq = d.pop("latent_query_num", 64)
        return cls(text_config=text, vision_config=vision, latent_query_num=lq, extra=d)

    @classmethod
    def from_json(cls, path: str | Path) -> "Kosmos2Config":
        """Read a ``config.json`` file."""
        path = Path(path)
        try:
            if not file_present(path):
                raise ConfigError(f"config file {str(path)!r} does not exist")
            text = read_text(path)
        except ConfigError:
            raise
        except ValueError as exc:  # a broken link, not a file, unreadable, not UTF-8
            raise ConfigError(f"config file {exc}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid JSON: {exc}") from None
        try:
            return cls.from_dict(d)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "Kosmos2Config":
        """Read ``folder/config.json``."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ConfigError(f"checkpoint folder {str(folder)!r} does not exist")
        return cls.from_json(folder / "config.json")

    def to_dict(self) -> dict:
        """A ``config.json``-shaped dict (transformers can read it back)."""

        def one(c, model_type):
            d = {k: v for k, v in asdict(c).items() if k != "extra"}
            d.update(c.extra)
            d.setdefault("model_type", model_type)
            return d

        out = dict(self.extra)
        out.update(
            {
                "model_type": "kosmos-2",
                "latent_query_num": self.latent_query_num,
                "text_config": one(self.text_config, "kosmos_2_text_model"),
                "vision_config": one(self.vision_config, "kosmos_2_vision_model"),
            }
        )
        out.setdefault("architectures", ["Kosmos2ForConditionalGeneration"])
        return out
