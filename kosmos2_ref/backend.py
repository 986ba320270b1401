"""The NumPy/CuPy switch.

All model code gets its array namespace from here. ``get_backend("numpy")`` (the default) and
``get_backend("cupy")`` return a :class:`Backend` whose ``xp`` is the array module; the environment variable
``KOSMOS2_BACKEND`` overrides the default when no name is given.

NumPy has no ``erf``; the exact-GELU of the text decoder needs one, so :func:`erf_numpy` below is an array-only
approximation accurate to float32 (tested against ``math.erf`` in ``tests/test_layers.py``). On CuPy the
library's own ``cupyx.scipy.special.erf`` is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

BACKENDS = ("numpy", "cupy")
ENV_VAR = "KOSMOS2_BACKEND"


class BackendError(ValueError):
    """A backend was asked for that does not exist or cannot run here."""


def _erfc_poly(xp, z):
    """erfc(z) for z >= 0: the Chebyshev-fitted form of Press et al., *Numerical Recipes* §6.2 (``erfcc``).

    Its fractional error is below 1.2e-7 for every z >= 0, i.e. at float32 resolution, and being relative (not
    absolute) it keeps the tail of GELU accurate for large negative inputs.
    """
    t = 1.0 / (1.0 + 0.5 * z)
    # Horner's rule from the innermost coefficient out, in place on one buffer (each step the same two roundings
    # as the nested expression -1.26551223 + t·(1.00002368 + t·(… + t·0.17087277)), without a temporary per step).
    poly = t * 0.17087277
    for c in (-0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806, 0.09678418, 0.37409196, 1.00002368):
        poly += c
        poly *= t
    poly += -1.26551223
    poly -= z * z  # exponent: -z² + poly
    r = xp.exp(poly, out=poly)
    r *= t
    return r


def erfc_numpy(x):
    """Complementary error function on a NumPy (or CuPy) array, in the array's own float dtype."""
    xp = get_xp(x)
    z = xp.abs(x)
    r = _erfc_poly(xp, z)  # erfc(|x|)
    # erfc(-z) = 2 - erfc(z) where x < 0. The two cases are blended with 0/1 weights (the products are exact, so
    # this equals xp.where(x >= 0, r, 2 - r) bit for bit) because NumPy's ``where`` on a data-dependent mask
    # runs ~8x slower than these few arithmetic passes.
    neg = (x < 0).astype(r.dtype)
    out = (2.0 - r) * neg
    neg -= 1.0  # -(1 - neg)
    r *= neg
    out -= r
    return out


def erf_numpy(x):
    """Error function on a NumPy array, accurate to float32 (|error| < 2.5e-7); erf = 1 - erfc."""
    return 1.0 - erfc_numpy(x)


@dataclass(frozen=True)
class Backend:
    """An array namespace plus the few functions the model needs that are not in it."""

    name: str
    xp: Any  # numpy or cupy
    erf: Callable[[Any], Any]
    erfc: Callable[[Any], Any]

    def to_device(self, a, dtype=None):
        """Host (NumPy) array -> this backend's array, once; no copy on NumPy when the dtype already fits."""
        if self.name == "numpy":
            return np.asarray(a, dtype=dtype)
        return self.xp.asarray(a, dtype=dtype)

    def to_numpy(self, a):
        return to_numpy(a)


def to_numpy(a):
    """Any backend's array (or a scalar / None) -> NumPy on the host."""
    if a is None or type(a) is np.ndarray:
        return a
    if hasattr(a, "get"):  # a CuPy array (or the test suite's strict stand-in): the explicit download
        return a.get()
    return np.asarray(a)


def get_xp(x):
    """The array module (numpy or cupy) that owns array ``x``.

    Arrays that name their own namespace (the Array API's ``__array_namespace__``) are honoured, which is how the
    test suite runs the model on a strict stand-in device namespace that rejects host arrays.
    """
    if type(x) is np.ndarray or np.isscalar(x):
        return np
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    ns = getattr(x, "__array_namespace__", None)
    return ns() if ns is not None else np


def has_own_erfc(x) -> bool:
    """Whether x's namespace brings an erfc kernel of its own (CuPy), rather than :func:`erfc_numpy`'s chain."""
    return type(x).__module__.split(".")[0] == "cupy"


def erfc(x):
    """erfc on any backend's array: CuPy's own where the array lives on the GPU, else :func:`erfc_numpy`."""
    if has_own_erfc(x):
        return get_backend("cupy").erfc(x)
    return erfc_numpy(x)


_CACHE: dict[str, Backend] = {}


def resolve_backend_name(name: str | None = None) -> str:
    """The backend name to use: the argument, else ``$KOSMOS2_BACKEND``, else ``"numpy"``."""
    if name is None:
        name = os.environ.get(ENV_VAR) or "numpy"
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise BackendError(f"backend={name!r} is not known: expected one of {BACKENDS} (argument or ${ENV_VAR})")
    return name.lower()


def get_backend(name: str | Backend | None = None) -> Backend:
    """The :class:`Backend` called ``name`` (``"numpy"`` or ``"cupy"``); ``None`` reads ``$KOSMOS2_BACKEND``."""
    if isinstance(name, Backend):
        return name
    name = resolve_backend_name(name)
    if name in _CACHE:
        return _CACHE[name]
    if name == "numpy":
        be = Backend("numpy", np, erf_numpy, erfc_numpy)
    else:
        be = _make_cupy_backend()
    _CACHE[name] = be
    return be


def _make_cupy_backend() -> Backend:
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library failing to load
        raise BackendError(
            "backend='cupy' needs CuPy, which is not importable here "
            f"({type(exc).__name__}: {exc}); install it on a machine with an NVIDIA GPU with "
            "`pip install kosmos2-ref[gpu]` (CUDA 13 drivers) or `kosmos2-ref[gpu-cuda12]` (CUDA 12; `nvidia-smi` "
            "prints which), or use backend='numpy'"
        ) from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise BackendError(
            f"backend='cupy' found no usable CUDA GPU ({type(exc).__name__}: {exc}); use backend='numpy'"
        ) from None
    if n < 1:
        raise BackendError("backend='cupy' found no CUDA GPU on this machine; use backend='numpy'")
    try:
        from cupyx.scipy.special import erf, erfc
    except Exception:  # older CuPy without cupyx.scipy.special: the array-only form works on CuPy too
        erf, erfc = erf_numpy, erfc_numpy
    return Backend("cupy", cupy, erf, erfc)


def cupy_available() -> tuple[bool, str]:
    """(True, "") where the CuPy backend can run, else (False, the reason) — used by tests to skip with a reason."""
    try:
        get_backend("cupy")
    except BackendError as exc:
        return False, str(exc)
    return True, ""
