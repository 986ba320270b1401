"""The one switch between the textbook primitives (:mod:`kosmos2_ref.layers`) and the fast ones
(:mod:`kosmos2_ref.fast`): the stages call the functions here, which pass each call on to one or the other.

Why a context variable, rather than an ``ops`` namespace handed down through every stage: the stage functions
keep the signatures a reader compares with transformers', and a stage called on its own (a notebook, a test)
simply runs the fast primitives. ``Kosmos2`` sets the variable for the length of each of its calls
(:func:`reference_mode`). A context variable is per thread (and per asyncio task), so two models, one in
reference mode and one not, can run side by side in threads without seeing each other's choice.

``Kosmos2(..., reference=None)`` reads ``$KOSMOS2_REFERENCE`` (see :func:`resolve_reference`).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar

from . import fast, layers

ENV_VAR = "KOSMOS2_REFERENCE"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")

_reference: ContextVar[bool] = ContextVar("kosmos2_reference", default=False)


def resolve_reference(reference: bool | None = None) -> bool:
    """The mode to run in: ``reference`` when given (True or False), else ``$KOSMOS2_REFERENCE`` (1/true/yes/on
    or 0/false/no/off/unset). A ValueError for anything else, so that a typo does not silently pick a mode."""
    if reference is None:
        value = os.environ.get(ENV_VAR, "").strip().lower()
        if value not in _TRUE + _FALSE:
            raise ValueError(f"${ENV_VAR}={os.environ[ENV_VAR]!r} is not understood: expected 1 or 0 "
                             f"(or true/false, yes/no, on/off)")
        return value in _TRUE
    if not isinstance(reference, bool):
        raise ValueError(f"reference must be True, False or None (read ${ENV_VAR}), got {reference!r}")
    return reference


@contextmanager
def reference_mode(on: bool = True):
    """Within the block, the primitives here are :mod:`layers`' (``on``) or :mod:`fast`'s (not ``on``)."""
    token = _reference.set(bool(on))
    try:
        yield
    finally:
        _reference.reset(token)


def in_reference_mode() -> bool:
    return _reference.get()


def _impl():
    return layers if _reference.get() else fast


def linear(x, weight, bias=None):
    """:func:`layers.linear` or :func:`fast.linear`. x [..., in], weight [out, in] -> [..., out]."""
    return _impl().linear(x, weight, bias)


def layer_norm(x, weight, bias, eps: float = 1e-5):
    """:func:`layers.layer_norm` or :func:`fast.layer_norm`. x [..., C] -> [..., C]."""
    return _impl().layer_norm(x, weight, bias, eps)


def gelu(x):
    """:func:`layers.gelu` or :func:`fast.gelu`."""
    return _impl().gelu(x)


def quick_gelu(x):
    """:func:`layers.quick_gelu` or :func:`fast.quick_gelu`."""
    return _impl().quick_gelu(x)


ACTIVATIONS = {"gelu": gelu, "quick_gelu": quick_gelu}


def feed_forward(x, fc1, fc2, activation: str, inner_norm=None, eps: float = 1e-5):
    """:func:`layers.feed_forward` or :func:`fast.feed_forward`. x [..., C] -> [..., C]."""
    return _impl().feed_forward(x, fc1, fc2, activation, inner_norm, eps)


def head_projection(x, weight, bias, num_heads: int):
    """:func:`layers.head_projection` or :func:`fast.head_projection`. x [B, T, C] -> [B, H, T, D]."""
    return _impl().head_projection(x, weight, bias, num_heads)


def attention(q, k, v, mask=None, scale: float | None = None, need_probs: bool = True):
    """:func:`layers.attention` or :func:`fast.attention`. q [B, H, T, D], k and v [B, H, S, D]
    -> (output [B, H, T, D], probabilities [B, H, T, S], or None from the fast form without ``need_probs``)."""
    return _impl().attention(q, k, v, mask, scale, need_probs)
