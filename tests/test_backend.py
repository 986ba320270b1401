"""The backend switch: numpy by default, $KOSMOS2_BACKEND overrides, cupy where absent fails clearly."""

from __future__ import annotations

import numpy as np
import pytest

from kosmos2_ref import Kosmos2
from kosmos2_ref.backend import BackendError, cupy_available, get_backend, resolve_backend_name, to_numpy

HAS_CUPY, WHY_NOT = cupy_available()


def test_default_is_numpy(monkeypatch):
    monkeypatch.delenv("KOSMOS2_BACKEND", raising=False)
    be = get_backend()
    assert be.name == "numpy" and be.xp is np


def test_environment_variable_chooses(monkeypatch):
    monkeypatch.setenv("KOSMOS2_BACKEND", "numpy")
    assert resolve_backend_name(None) == "numpy"
    monkeypatch.setenv("KOSMOS2_BACKEND", "tpu")
    with pytest.raises(BackendError, match=r"backend='tpu' is not known: expected one of \('numpy', 'cupy'\)"):
        get_backend()


def test_explicit_argument_wins_over_environment(monkeypatch):
    monkeypatch.setenv("KOSMOS2_BACKEND", "cupy")
    assert get_backend("numpy").name == "numpy"


def test_unknown_name():
    with pytest.raises(BackendError, match="backend='jax' is not known"):
        get_backend("jax")
    assert issubclass(BackendError, ValueError)


@pytest.mark.skipif(HAS_CUPY, reason="CuPy with a GPU is present here; this checks the error where it is absent")
def test_cupy_absent_is_a_clear_error(tiny_checkpoint):
    with pytest.raises(BackendError, match=r"backend='cupy' (needs CuPy|found no)"):
        get_backend("cupy")
    with pytest.raises(BackendError, match=r"backend='cupy'"):
        Kosmos2.from_pretrained(tiny_checkpoint[0], backend="cupy")


def test_to_numpy_passthrough():
    a = np.ones(3, np.float32)
    assert to_numpy(a) is a and to_numpy(None) is None
