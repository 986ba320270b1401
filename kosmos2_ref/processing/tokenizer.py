"""The Kosmos-2 tokenizer: ``tokenizer.json`` through the ``tokenizers`` library, or one built from the original
``sentencepiece.bpe.model``.

Mirrors transformers 5.23: ``tokenization_utils_tokenizers.py`` (``TokenizersBackend``: padding, truncation,
decode), ``tokenization_utils_base.py`` (``_get_padding_truncation_strategies``, ``clean_up_tokenization``),
``models/xlm_roberta/tokenization_xlm_roberta.py`` and ``convert_slow_tokenizer.py`` (``XLMRobertaConverter``:
how the fairseq id layout is built from the SentencePiece model), and the token additions of
``models/kosmos2/processing_kosmos2.py``. docs/numerics.md §9 (ids), §10.2 (padding).

Id layout (docs/numerics.md §9): ``<s>``=0 ``<pad>``=1 ``</s>``=2 ``<unk>``=3; SentencePiece piece k (k >= 3)
gets id k + 1 (SentencePiece's own ``<unk> <s> </s>`` at 0, 1, 2 are replaced by the fairseq specials);
``<mask>``=64001; the 11 tag tokens 64002…64012 and ``<patch_index_0000>``…``<patch_index_1023>`` =
64013…65036, added with ``lstrip=True, normalized=False`` and not special.
"""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

from ..files import file_present, read_json_object, read_text
from .sentencepiece_model import read_sentencepiece_model

# The fairseq/XLM-R special tokens, in id order 0..3; <mask> comes after the SentencePiece pieces.
BOS_TOKEN, PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, MASK_TOKEN = "<s>", "<pad>", "</s>", "<unk>", "<mask>"

# The processor's tag tokens, in the order transformers adds them (processing_kosmos2.py, Kosmos2Processor.__init__).
EOD_TOKEN = "</doc>"
BOI_TOKEN, EOI_TOKEN = "<image>", "</image>"
EOC_TOKEN, EOL_TOKEN = "</chunk>", "</line>"
BOP_TOKEN, EOP_TOKEN = "<phrase>", "</phrase>"
BOO_TOKEN, EOO_TOKEN = "<object>", "</object>"
DOM_TOKEN = "</delimiter_of_multi_objects/>"
GRD_TOKEN = "<grounding>"
TAG_TOKENS = (
    EOD_TOKEN, BOI_TOKEN, EOI_TOKEN, EOC_TOKEN, EOL_TOKEN, BOP_TOKEN, EOP_TOKEN,
    BOO_TOKEN, EOO_TOKEN, DOM_TOKEN, GRD_TOKEN,
)  # fmt: skip
NUM_PATCH_INDEX_TOKENS = 1024

# transformers' "no limit" sentinels (tokenization_utils_base.py): a model_max_length above LARGE_INTEGER means
# "unknown", so padding to max_length without a max_length does nothing.
VERY_LARGE_INTEGER = int(1e30)
LARGE_INTEGER = int(1e20)

PACKAGED_SENTENCEPIECE_MODEL = Path(__file__).resolve().parent.parent / "assets" / "sentencepiece.bpe.model"


def patch_index_token(index: int) -> str:
    """The token naming grid cell ``index``: ``<patch_index_0044>`` (zero-padded to 4 digits,
    docs/numerics.md §10.3)."""
    return f"<patch_index_{index:04d}>"


def kosmos2_added_tokens(num_patch_index_tokens: int = NUM_PATCH_INDEX_TOKENS) -> list[AddedToken]:
    """The 11 tags then the patch tokens, as the processor adds them: lstrip, not normalised, not special.

    lstrip makes whitespace just before a tag part of the tag, so ``"a <phrase>"`` and ``"a<phrase>"`` give the
    same ids (docs/numerics.md §9).
    """
    names = list(TAG_TOKENS) + [patch_index_token(i) for i in range(num_patch_index_tokens)]
    return [AddedToken(name, lstrip=True, rstrip=False, normalized=False, special=False) for name in names]


def _special_added_token(content: str) -> AddedToken:
    return AddedToken(content, lstrip=False, rstrip=False, normalized=False, special=True)


def _xlm_roberta_pipeline(tokenizer: Tokenizer, bos_id: int, eos_id: int) -> None:
    """Give ``tokenizer`` the pre-tokenizer, decoder and template of transformers 5.23's XLMRobertaTokenizer.

    WhitespaceSplit drops every run of whitespace (SentencePiece's remove_extra_whitespaces), and Metaspace with
    prepend_scheme="always" puts "▁" before each word (add_dummy_prefix). The template adds ``<s> … </s>`` when
    ``add_special_tokens`` is on (tokenization_xlm_roberta.py).
    """
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        pair=f"{BOS_TOKEN} $A {EOS_TOKEN} {EOS_TOKEN} $B {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, bos_id), (EOS_TOKEN, eos_id)],
    )


def build_tokenizer_from_sentencepiece(model_file: str | Path, add_kosmos2_tokens: bool = True) -> Tokenizer:
    """Build the Kosmos-2 ``tokenizers.Tokenizer`` from a SentencePiece unigram ``.model`` file.

    The vocabulary is laid out as transformers' XLMRobertaConverter does (convert_slow_tokenizer.py): the four
    fairseq specials with score 0, the pieces from SentencePiece id 3 on with their scores, then ``<mask>``.
    The normaliser is the model's precompiled character map (nmt_nfkc for Kosmos-2); the pipeline is the one of
    ``_xlm_roberta_pipeline``. With ``add_kosmos2_tokens`` the tag and patch tokens follow (ids 64002…65036).
    """
    spm = _read_sentencepiece_model_cached(str(Path(model_file).resolve()))
    if spm.model_type != "unigram":
        raise ValueError(
            f"{str(model_file)!r}: expected a SentencePiece unigram model, got model_type {spm.model_type!r}"
        )
    if (spm.unk_id, spm.bos_id, spm.eos_id) != (0, 1, 2):
        raise ValueError(
            f"{str(model_file)!r}: expected the fairseq layout unk_id=0, bos_id=1, eos_id=2 (the first three pieces "
            f"are replaced by <s> <pad> </s> <unk>), got unk_id={spm.unk_id}, bos_id={spm.bos_id}, eos_id={spm.eos_id}"
        )
    specials = [BOS_TOKEN, PAD_TOKEN, EOS_TOKEN, UNK_TOKEN]
    vocab = [(name, 0.0) for name in specials]
    vocab += [(p.piece, float(p.score)) for p in spm.pieces[3:]]  # SentencePiece id k -> id k + 1
    vocab.append((MASK_TOKEN, 0.0))

    tokenizer = Tokenizer(Unigram(vocab, unk_id=3, byte_fallback=False))
    if spm.precompiled_charsmap:
        tokenizer.normalizer = normalizers.Precompiled(spm.precompiled_charsmap)
    _xlm_roberta_pipeline(tokenizer, bos_id=0, eos_id=2)
    tokenizer.add_special_tokens([_special_added_token(t) for t in specials + [MASK_TOKEN]])
    if add_kosmos2_tokens:
        tokenizer.add_tokens(kosmos2_added_tokens())
    return tokenizer


@functools.lru_cache(maxsize=4)
def _read_sentencepiece_model_cached(model_file: str):
    # Parsing 64000 pieces in Python takes ~0.3 s; building the Tokenizer from them ~0.1 s. The parsed model is
    # cached, not a serialised tokenizer: JSON parsing in `tokenizers` may move a score by one ulp, and the
    # in-memory build keeps the scores exactly as transformers' converter does.
    return read_sentencepiece_model(model_file)


def _clean_up_tokenization(text: str) -> str:
    """Remove the space before punctuation and English contractions (tokenization_utils_base.py)."""
    for before, after in (
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
        (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ):  # fmt: skip
        text = text.replace(before, after)
    return text


def _padding_strategy(padding) -> str:
    """Map the ``padding`` argument to "do_not_pad" | "longest" | "max_length" (PaddingStrategy)."""
    if padding is False or padding is None:
        return "do_not_pad"
    if padding is True:
        return "longest"
    if isinstance(padding, str) and padding in ("longest", "max_length", "do_not_pad"):
        return padding
    raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")


def _truncation_strategy(truncation) -> str:
    """Map the ``truncation`` argument to "do_not_truncate" | "longest_first" | "only_first" (TruncationStrategy)."""
    if truncation is False or truncation is None:
        return "do_not_truncate"
    if truncation is True:
        return "longest_first"
    if isinstance(truncation, str) and truncation in ("longest_first", "only_first", "do_not_truncate"):
        return truncation
    raise ValueError(
        f"truncation must be True, False, None, 'longest_first', 'only_first' or 'do_not_truncate', got {truncation!r}"
    )


def _check_side(name: str, side) -> str:
    if side not in ("right", "left"):
        raise ValueError(f"{name} must be 'right' or 'left', got {side!r}")
    return side


class Kosmos2Tokenizer:
    """A ``tokenizers.Tokenizer`` with the transformers 5.23 ``TokenizersBackend`` call semantics.

    Holds the backend tokenizer, the names of the special tokens and the padding/truncation defaults. The
    Kosmos-2 tag and patch tokens are added on construction (as ``Kosmos2Processor.__init__`` does in
    transformers); tokens already present keep their ids.

    Safe to share between threads: padding and truncation are settings *of the backend tokenizer*, switched on
    for one call and off after it, so every call that changes the backend (or reads those settings, as saving
    does) holds ``self._lock``; otherwise one thread's padding would leak into another thread's call.
    """

    def __init__(
        self,
        backend: Tokenizer,
        *,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        pad_token: str | None = PAD_TOKEN,
        unk_token: str = UNK_TOKEN,
        mask_token: str | None = MASK_TOKEN,
        padding_side: str = "right",
        truncation_side: str = "right",
        model_max_length: int = VERY_LARGE_INTEGER,
        clean_up_tokenization_spaces: bool = False,
        add_kosmos2_tokens: bool = True,
    ):
        self._tokenizer = backend
        self._lock = threading.RLock()  # held while the backend's settings are changed and used
        # Padding and truncation are set per call (as transformers does); start from a clean state.
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.unk_token, self.mask_token = unk_token, mask_token
        self.padding_side = _check_side("padding_side", padding_side)
        self.truncation_side = _check_side("truncation_side", truncation_side)
        self.model_max_length = int(model_max_length)
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        if add_kosmos2_tokens:
            self.add_kosmos2_tokens()
        for name in ("bos_token", "eos_token", "unk_token"):
            if self.token_to_id(getattr(self, name)) is None:
                raise ValueError(f"{name} {getattr(self, name)!r} is not in the tokenizer's vocabulary")

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_sentencepiece(cls, model_file: str | Path, **kwargs) -> "Kosmos2Tokenizer":
        """The Kosmos-2 tokenizer built from a SentencePiece ``.model`` file (see
        ``build_tokenizer_from_sentencepiece``)."""
        return cls(build_tokenizer_from_sentencepiece(model_file, add_kosmos2_tokens=False), **kwargs)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides) -> "Kosmos2Tokenizer":
        """Load ``tokenizer.json`` (or ``sentencepiece.bpe.model`` when there is no tokenizer.json) from ``folder``,
        with special tokens and defaults from ``tokenizer_config.json`` / ``special_tokens_map.json`` if present.

        ``overrides`` (e.g. ``padding_side="left"``) win over the files, as kwargs of transformers'
        ``from_pretrained`` do.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"tokenizer folder not found: {str(folder)!r}")
        settings = _read_tokenizer_settings(folder)
        settings.update(overrides)
        tokenizer_json = folder / "tokenizer.json"
        spm_file = folder / "sentencepiece.bpe.model"
        if file_present(tokenizer_json):
            text = read_text(tokenizer_json)  # unreadable: says so, rather than "not a valid file"
            try:
                backend = Tokenizer.from_str(text)
            except Exception as err:  # the Rust side raises a bare Exception on malformed files
                raise ValueError(f"{str(tokenizer_json)!r} is not a valid tokenizers JSON file: {err}") from err
            # A tokenizer.json may carry padding/truncation settings; transformers reads their sides as defaults.
            if backend.padding is not None:
                settings.setdefault("padding_side", backend.padding["direction"])
            if backend.truncation is not None:
                settings.setdefault("truncation_side", backend.truncation["direction"])
        elif file_present(spm_file):
            backend = build_tokenizer_from_sentencepiece(spm_file, add_kosmos2_tokens=False)
        else:
            raise ValueError(f"no tokenizer in {str(folder)!r}: expected tokenizer.json or sentencepiece.bpe.model")
        return cls(backend, **settings)

    def add_kosmos2_tokens(self, num_patch_index_tokens: int = NUM_PATCH_INDEX_TOKENS) -> int:
        """Add the tag and patch tokens not yet in the vocabulary (appended in order); return how many were new."""
        with self._lock:
            return self._tokenizer.add_tokens(kosmos2_added_tokens(num_patch_index_tokens))

    # ------------------------------------------------------------------------------------------------- vocabulary
    def __len__(self) -> int:
        """Vocabulary size with added tokens (65037 for Kosmos-2), like ``len(tokenizer)`` in transformers."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        return self._tokenizer.id_to_token(index)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self._tokenizer.id_to_token(int(i)) for i in ids]

    @property
    def bos_token_id(self) -> int:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        return self.token_to_id(self.eos_token)

    @property
    def unk_token_id(self) -> int:
        return self.token_to_id(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.token_to_id(self.pad_token)

    @property
    def mask_token_id(self) -> int | None:
        return None if self.mask_token is None else self.token_to_id(self.mask_token)

    # --------------------------------------------------------------------------------------------------- encoding
    def resolve_padding_truncation(self, padding=False, truncation=None, max_length=None):
        """Return (padding strategy, truncation strategy, max_length) as transformers'
        ``_get_padding_truncation_strategies`` does.

        Quirks kept: ``max_length`` alone turns truncation on; padding to "max_length" with no ``max_length`` and
        no known ``model_max_length`` does not pad.
        """
        if max_length is not None and (not isinstance(max_length, (int, np.integer)) or max_length < 0):
            raise ValueError(f"max_length must be a non-negative int or None, got {max_length!r}")
        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"
        pad = _padding_strategy(padding)
        trunc = _truncation_strategy(truncation)
        if max_length is None:
            if pad == "max_length":
                if self.model_max_length > LARGE_INTEGER:
                    pad = "do_not_pad"
                else:
                    max_length = self.model_max_length
            if trunc != "do_not_truncate":
                if self.model_max_length > LARGE_INTEGER:
                    trunc = "do_not_truncate"
                else:
                    max_length = self.model_max_length
        if pad != "do_not_pad" and self.pad_token_id is None:
            raise ValueError("padding was asked for, but the tokenizer has no pad_token")
        return pad, trunc, None if max_length is None else int(max_length)

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        add_special_tokens: bool = True,
        padding=False,
        truncation=None,
        max_length: int | None = None,
        padding_side: str | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Tokenise a batch of strings; return (input_ids, attention_mask) as lists of lists.

        Padding and truncation go through the backend exactly as ``TokenizersBackend.set_truncation_and_padding``
        sets them (pad id/token from ``pad_token``, side from ``padding_side`` or the tokenizer's default), and are
        cleared afterwards.
        """
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"text[{i}] must be a str, got {type(text).__name__}")
        pad, trunc, max_length = self.resolve_padding_truncation(padding, truncation, max_length)
        side = self.padding_side if padding_side is None else _check_side("padding_side", padding_side)
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of <= 0):
            raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")
        with self._lock:  # the settings below belong to the shared backend: one call at a time
            try:
                if trunc != "do_not_truncate":
                    self._tokenizer.enable_truncation(
                        max_length, stride=0, strategy=trunc, direction=self.truncation_side
                    )
                if pad != "do_not_pad":
                    self._tokenizer.enable_padding(
                        direction=side,
                        pad_id=self.pad_token_id,
                        pad_type_id=0,
                        pad_token=self.pad_token,
                        length=max_length if pad == "max_length" else None,
                        pad_to_multiple_of=pad_to_multiple_of,
                    )
                encodings = self._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
            except Exception as err:
                if isinstance(err, ValueError):
                    raise
                raise ValueError(f"tokenisation failed: {err}") from err
            finally:
                self._tokenizer.no_truncation()
                self._tokenizer.no_padding()
        return [list(e.ids) for e in encodings], [list(e.attention_mask) for e in encodings]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of one string (``<s> … </s>`` around it when ``add_special_tokens``)."""
        return self.encode_batch([text], add_special_tokens=add_special_tokens)[0][0]

    # --------------------------------------------------------------------------------------------------- decoding
    def _check_ids(self, ids) -> list[int]:
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"token ids must be a 1-D sequence of ints, got an array of shape {arr.shape}")
        if arr.size == 0:
            return []
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
        low, high, size = int(arr.min()), int(arr.max()), len(self)
        if low < 0 or high >= size:
            raise ValueError(f"token ids must lie in [0, {size}), got values in [{low}, {high}]")
        return arr.tolist()

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str:
        """Text of one id sequence (TokenizersBackend._decode).

        ``skip_special_tokens`` drops the tokens flagged special (``<s> <pad> </s> <unk> <mask>``); tags and patch
        tokens stay. The clean-up of spaces before punctuation runs only when asked for (default off in 5.x) and
        never for BPE models, as in transformers.
        """
        text = self._tokenizer.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces and type(self._tokenizer.model).__name__ != "BPE":
            text = _clean_up_tokenization(text)
        return text

    def batch_decode(
        self, sequences, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None
    ) -> list[str]:
        """``decode`` of each row of a [B, T] array or list of id lists; a 1-D input is one sequence."""
        if isinstance(sequences, np.ndarray) and sequences.ndim == 1:
            sequences = [sequences]
        elif isinstance(sequences, (list, tuple)) and (len(sequences) == 0 or np.ndim(sequences[0]) == 0):
            sequences = [sequences]
        elif isinstance(sequences, np.ndarray) and sequences.ndim != 2:
            raise ValueError(f"sequences must be 1-D or 2-D, got an array of shape {sequences.shape}")
        return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in sequences]

    # ----------------------------------------------------------------------------------------------------- saving
    def save_pretrained(self, folder: str | Path) -> list[Path]:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``folder``.

        tokenizer_config.json names ``XLMRobertaTokenizer`` (the class of the released checkpoint); the pipeline
        in tokenizer.json is the one that class rebuilds in transformers 5.x, so transformers reads the same
        tokenizer whether it loads the file as it is or through that class.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / "tokenizer.json", folder / "tokenizer_config.json", folder / "special_tokens_map.json"]
        with self._lock:  # not while another thread's call has padding switched on
            self._tokenizer.save(str(paths[0]))
        special = {
            "bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
            "sep_token": self.eos_token, "cls_token": self.bos_token,
            "pad_token": self.pad_token, "mask_token": self.mask_token,
        }  # fmt: skip
        special = {k: v for k, v in special.items() if v is not None}
        config = {
            "tokenizer_class": "XLMRobertaTokenizer",
            "processor_class": "Kosmos2Processor",
            "add_prefix_space": True,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            **special,
        }
        _write_json(paths[1], config)
        _write_json(paths[2], special)
        return paths


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _token_name(value) -> str | None:
    """A special token as written in the config files: a string or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_tokenizer_settings(folder: Path) -> dict:
    """Special tokens and defaults from special_tokens_map.json then tokenizer_config.json (the latter wins).

    A value of the wrong kind raises a ValueError naming the file and the key: a string ``"false"`` is not a
    boolean (it would read as true), and ``model_max_length`` must be a whole number.
    """
    settings: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if not file_present(path):
            continue
        data = read_json_object(path)

        def refuse(key, expected, path=path, data=data):  # this file's
            return ValueError(f"{str(path)!r}: {key} must be {expected}, got {data[key]!r}")

        for key in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token"):
            if key in data and _token_name(data[key]) is not None:
                if not isinstance(_token_name(data[key]), str):
                    raise refuse(key, "a token (a string, or an object with a string 'content')")
                settings[key] = _token_name(data[key])
        for key in ("padding_side", "truncation_side"):
            if key in data:
                if data[key] not in ("right", "left"):
                    raise refuse(key, "'right' or 'left'")
                settings[key] = data[key]
        if data.get("model_max_length") is not None:
            value = data["model_max_length"]
            # a whole number; transformers writes its "no limit" 1e30 as an int, some files as the float 1e+30
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not _is_whole(value) or value < 1:
                raise refuse("model_max_length", "a positive whole number of tokens")
            settings["model_max_length"] = int(value)
        if "clean_up_tokenization_spaces" in data:
            if not isinstance(data["clean_up_tokenization_spaces"], bool):
                raise refuse("clean_up_tokenization_spaces", "true or false (a JSON boolean, not a string)")
            settings["clean_up_tokenization_spaces"] = data["clean_up_tokenization_spaces"]
    return settings


def _is_whole(value: int | float) -> bool:
    return isinstance(value, int) or (value == value and abs(value) != float("inf") and value == int(value))


def default_tokenizer(**kwargs) -> Kosmos2Tokenizer:
    """The real Kosmos-2 tokenizer, built offline from the SentencePiece model shipped in ``kosmos2_ref/assets``."""
    if not PACKAGED_SENTENCEPIECE_MODEL.is_file():
        raise ValueError(f"the packaged SentencePiece model is missing: {str(PACKAGED_SENTENCEPIECE_MODEL)!r}")
    return Kosmos2Tokenizer.from_sentencepiece(PACKAGED_SENTENCEPIECE_MODEL, **kwargs)
