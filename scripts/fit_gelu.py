"""Derives the polynomial behind ``kosmos2_ref.fast.gelu``: exact GELU written as x · sigmoid(L(x)).

GELU(x) = x · Φ(x), and Φ(x) = sigmoid(L(x)) with L(x) = log(Φ(x) / Φ(−x)), the logit of the normal CDF. L is
odd and smooth, so L(x) = x · P(x²) for an even-power polynomial P. With P known, GELU takes a handful of NumPy
passes (x², a Horner chain, one exp, one division) where the erfc form takes about forty.

What the fit minimises. An error ΔL in L moves GELU by x · s(1 − s) · ΔL (s = sigmoid(L)), so the error that
matters, relative to |x| (the size of GELU's input, as with float32 rounding), is

    w(x) · |P(x²) − L(x)/x|,   w(x) = x · s(1 − s).

The weight falls like e^−|L| away from 0: past |x| ≈ 5.5 (|L| ≈ 17.7) a sigmoid is 0 or 1 to within 2e-8 whatever
P is, as long as P keeps growing, so the fit covers 0 < x ≤ X_MAX and the script checks that P (with a positive
leading coefficient) only grows beyond. The minimax fit is Lawson's iteration on weighted least squares.
The exact L comes from ``math.erfc`` in float64 (relative error ~1e-16, far below float32's 6e-8).

    python scripts/fit_gelu.py            # prints the coefficients and the fit's error

Its output is what ``fast.GELU_LOGIT`` holds; tests/test_fast.py reruns the fit and compares.
"""

from __future__ import annotations

import math

import numpy as np

DEGREE = 6  # P's degree in u = x²: seven coefficients
X_MAX = 5.5  # the fit covers 0 < x <= X_MAX
POINTS = 20000
ITERATIONS = 60


def logit_of_normal_cdf(x: np.ndarray) -> np.ndarray:
    """L(x) = log(Φ(x) / Φ(−x)) in float64, for x > 0 (both tails from erfc, so neither cancels)."""
    upper = np.array([math.erfc(-v / math.sqrt(2.0)) for v in x])  # 2 Φ(x)
    lower = np.array([math.erfc(v / math.sqrt(2.0)) for v in x])  # 2 Φ(−x)
    return np.log(upper / lower)


def fit(degree: int = DEGREE, x_max: float = X_MAX, points: int = POINTS, iterations: int = ITERATIONS):
    """P's coefficients (u⁰ first) and the largest weighted error w(x) · |P(x²) − L(x)/x| on the grid."""
    x = np.linspace(1e-4, x_max, points)
    L = logit_of_normal_cdf(x)
    s = 1.0 / (1.0 + np.exp(-L))
    w = x * s * (1.0 - s)
    scale = x_max**2  # fit in u / x_max², so the columns are all O(1)
    A = np.vander(x * x / scale, degree + 1, increasing=True)  # [points, degree + 1]
    lawson = np.full(points, 1.0 / points)
    for _ in range(iterations):
        root = w * np.sqrt(lawson)
        c, *_ = np.linalg.lstsq(A * root[:, None], (L / x) * root, rcond=None)
        err = w * np.abs(A @ c - L / x)
        lawson *= err
        lawson /= lawson.sum()
    return c / scale ** np.arange(degree + 1), float(err.max())


def grows_beyond(coefficients, x_max: float = X_MAX) -> bool:
    """Whether P and P' stay positive from x_max² on (checked to u = 1e12; beyond, the positive leading term rules)."""
    P = np.polynomial.Polynomial(coefficients)
    u = np.geomspace(x_max**2, 1e12, 200000)
    return bool(coefficients[-1] > 0 and (P(u) > 0).all() and (P.deriv()(u) > 0).all())


def main() -> None:
    c, err = fit()
    print("P's coefficients, u^0 first:")
    for v in c:
        print(f"    {float(v)!r},")
    print(f"largest weighted error on 0 < x <= {X_MAX}: {err:.2e} (relative to |x|)")
    print(f"P grows beyond x = {X_MAX}: {grows_beyond(c)}")


if __name__ == "__main__":
    main()
