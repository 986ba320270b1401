"""Streaming: text handed out while it is generated (transformers' ``generation/streamers.py`` protocol:
``put(ids)`` with the prompt, then each step's tokens, and ``end()``)."""

from __future__ import annotations

from typing import Callable

import numpy as np


class TextStreamer:
    """Decode tokens as they are generated and hand out finished text (transformers' ``TextStreamer`` idea).

    ``generate(..., streamer=TextStreamer(tokenizer))`` calls :meth:`put` with the prompt ids [1, T], then with
    each new token [1], and :meth:`end` at the end. Text is released up to the last space (a later token can
    still change a word), at once after a newline, and entirely at :meth:`end`; a trailing U+FFFD (half of a
    multi-byte character split over byte tokens) is held back. ``on_text(text, end)`` receives it (default:
    print); :attr:`text` holds everything released so far. ``tokenizer`` is anything with ``decode(ids, **kw)``.
    """

    def __init__(
        self, tokenizer, skip_prompt: bool = False, on_text: Callable[[str, bool], None] | None = None, **decode_kwargs
    ):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.on_text = on_text if on_text is not None else self._print
        self.text = ""
        self._tokens: list[int] = []
        self._released = 0  # characters of decode(self._tokens) already handed out
        self._saw_prompt = False

    @staticmethod
    def _print(text: str, end: bool) -> None:
        print(text, end="\n" if end else "", flush=True)

    def _emit(self, text: str, end: bool = False) -> None:
        self.text += text
        self.on_text(text, end)

    def put(self, token_ids) -> None:
        ids = np.asarray(token_ids)
        if ids.ndim > 1:
            if ids.shape[0] != 1:
                raise ValueError(f"TextStreamer streams one sequence; got a batch of {ids.shape[0]}")
            ids = ids[0]
        if not self._saw_prompt:
            self._saw_prompt = True
            if self.skip_prompt:
                return
        self._tokens.extend(int(i) for i in ids.reshape(-1))
        full = self.tokenizer.decode(self._tokens, **self.decode_kwargs)
        if full.endswith("\n"):  # a line is complete: release it and start afresh
            self._emit(full[self._released :])
            self._tokens, self._released = [], 0
            return
        stable = full.rstrip("\ufffd")
        cut = stable.rfind(" ") + 1
        if cut > self._released:
            self._emit(full[self._released : cut])
            self._released = cut

    def end(self) -> None:
        rest = self.tokenizer.decode(self._tokens, **self.decode_kwargs)[self._released :] if self._tokens else ""
        self._tokens, self._released, self._saw_prompt = [], 0, False
        self._emit(rest, end=True)
