"""A strict stand-in for a device array namespace, to prove the model code is backend-neutral without a GPU.

``DeviceArray`` is an ndarray subclass that plays the part of a CuPy array:
* mixing it with a plain host ``np.ndarray`` in any operation raises :class:`HostArrayError` (on CuPy that is an
  error or a hidden host↔device copy);
* calling a ``np.*`` function on it (instead of the namespace's ``xp.*``) raises :class:`HostArrayError`;
* ``STRICT.asarray(host)`` is the one explicit upload, like ``cupy.asarray``;
* ``.get()`` is the one explicit download, like CuPy's, and each is counted (``TRANSFERS``) so a test can bound
  the device->host round trips; an implicit one (``int(a)``, ``float(a)``, ``bool(a)``, ``a.item()``,
  ``a.tolist()``: on CuPy each is a hidden synchronising copy) raises :class:`HostArrayError`.
``get_xp`` finds ``STRICT`` through ``__array_namespace__``, as it would find ``cupy``.
"""

from __future__ import annotations

import types

import numpy as np

from kosmos2_ref.backend import Backend, erf_numpy, erfc_numpy


class HostArrayError(TypeError):
    pass


def _is_host(a) -> bool:
    return isinstance(a, np.ndarray) and not isinstance(a, DeviceArray) and a.ndim > 0


def _check(args, what):
    for a in args:
        if isinstance(a, (list, tuple)):
            _check(a, what)
        elif _is_host(a):
            raise HostArrayError(f"{what} received a host numpy array of shape {a.shape} on the device path")


def _unwrap(a):
    if isinstance(a, DeviceArray):
        return a.view(np.ndarray)
    if isinstance(a, (list, tuple)):
        return type(a)(_unwrap(x) for x in a)
    return a


def _wrap(r):
    if isinstance(r, np.ndarray) and not isinstance(r, DeviceArray):
        return r.view(DeviceArray)
    if isinstance(r, np.generic):  # a full reduction: CuPy gives a 0-d device array, not a scalar
        return np.asarray(r).view(DeviceArray)
    if isinstance(r, tuple):
        return tuple(_wrap(x) for x in r)
    return r


class Transfers:
    """Counts explicit device->host downloads (``DeviceArray.get``) and the elements they carried."""

    def __init__(self):
        self.count = 0
        self.elements = 0


TRANSFERS = Transfers()


class DeviceArray(np.ndarray):
    def __array_namespace__(self, api_version=None):
        return STRICT

    def get(self):
        """The explicit download (CuPy's ``.get()``): a plain host copy, counted."""
        TRANSFERS.count += 1
        TRANSFERS.elements += self.size
        return np.array(self.view(np.ndarray))

    def _implicit(self, *args, **kwargs):
        raise HostArrayError(
            "implicit device->host transfer (int/float/bool/item/tolist) of a device array: "
            "bring results home once, explicitly"
        )

    __bool__ = __int__ = __float__ = __index__ = item = tolist = _implicit

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _check(inputs, f"ufunc {ufunc.__name__}")
        if "out" in kwargs:
            kwargs["out"] = _unwrap(kwargs["out"])
        return _wrap(getattr(ufunc, method)(*_unwrap(inputs), **kwargs))

    def __array_function__(self, func, types_, args, kwargs):
        raise HostArrayError(f"NumPy-only call np.{func.__name__} on a device array: use the backend's xp")


_UPLOADS = {"asarray", "array", "ascontiguousarray"}


class _StrictNamespace(types.SimpleNamespace):
    __name__ = "strict_xp"

    def __getattr__(self, name):
        attr = getattr(np, name)
        if isinstance(attr, type) or not callable(attr):
            return attr  # dtypes, finfo, constants

        def call(*args, **kwargs):
            if name not in _UPLOADS:
                _check(args, f"xp.{name}")
                _check(tuple(kwargs.values()), f"xp.{name}")
            return _wrap(attr(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()}))

        return call


STRICT = _StrictNamespace()
STRICT_BACKEND = Backend("strict", STRICT, erf_numpy, erfc_numpy)
