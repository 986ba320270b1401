"""Block sizes follow the processor: cache sizes as the system reports them (kosmos2_ref.machine), the blocks
derived from them, and the 2-byte widening's blocks measured once per process or fixed by KOSMOS2_UPCAST_BLOCKS."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time

import numpy as np
import pytest

from kosmos2_ref import fast, layers, machine


def write_cache(folder, index, level, kind, size):
    d = folder / f"index{index}"
    d.mkdir(parents=True)
    (d / "level").write_text(f"{level}\n")
    (d / "type").write_text(f"{kind}\n")
    (d / "size").write_text(f"{size}\n")


@pytest.mark.parametrize("text, expected", [("512K", 512 << 10), ("32768K", 32 << 20), ("2M", 2 << 20), ("4096", 4096)])
def test_parse_size(text, expected):
    assert machine.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "K", "big", "1.5M"])
def test_parse_size_of_nonsense_is_zero(text):
    assert machine.parse_size(text) == 0


def test_sysfs_caches_are_read_per_level(tmp_path):
    write_cache(tmp_path, 0, 1, "Data", "48K")
    write_cache(tmp_path, 1, 1, "Instruction", "32K")
    write_cache(tmp_path, 2, 2, "Unified", "2048K")
    write_cache(tmp_path, 3, 3, "Unified", "105M")
    assert machine.cache_sizes(tmp_path) == machine.CacheSizes(48 << 10, 2 << 20, 105 << 20, "sysfs")


def test_a_missing_level_is_assumed_and_said(tmp_path, monkeypatch):
    write_cache(tmp_path, 0, 2, "Unified", "1M")
    sizes = machine.cache_sizes(tmp_path)
    assert sizes.l2 == 1 << 20 and sizes.l1d == machine.ASSUMED["l1d"] and sizes.l3 == machine.ASSUMED["l3"]
    assert sizes.source == "sysfs (l1d, l3 assumed)"


def test_nothing_reported_means_assumed(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "_from_sysconf", lambda: {})
    assert machine.cache_sizes(tmp_path / "absent") == machine.CacheSizes(**machine.ASSUMED, source="assumed")


def test_blocks_follow_the_l2():
    """Half an L2 of float32 per element-wise block and per transposing tile; the widening starts at 2 and 8
    L2s (few rows: the block's even and odd columns one L2 each); the per-row product's blocks an L2 but at least
    2 MiB; the attention block an L2 of scores, 1-8 MiB. A 2 MiB L2 gives four times a 512 KiB L2's."""
    epyc = fast.derived_blocks(machine.CacheSizes(32 << 10, 512 << 10, 32 << 20, "test"))
    assert epyc == {
        "elementwise": 1 << 16,
        "transpose_tile": (128, 512),
        "upcast_few_rows": 1 << 20,
        "upcast_many_rows": 4 << 20,
        "matvec_block": 2 << 20,
        "attention_block": 1 << 20,
    }
    xeon = fast.derived_blocks(machine.CacheSizes(48 << 10, 2 << 20, 105 << 20, "test"))
    assert xeon == {
        "elementwise": 1 << 18,
        "transpose_tile": (128, 2048),
        "upcast_few_rows": 4 << 20,
        "upcast_many_rows": 16 << 20,
        "matvec_block": 2 << 20,
        "attention_block": 2 << 20,
    }
    big = fast.derived_blocks(machine.CacheSizes(48 << 10, 8 << 20, 105 << 20, "test"))
    assert big["matvec_block"] == 8 << 20 and big["attention_block"] == 8 << 20
    small = fast.derived_blocks(machine.CacheSizes(32 << 10, 256 << 10, 8 << 20, "test"))
    assert small["attention_block"] == 1 << 20
    odd = fast.derived_blocks(machine.CacheSizes(32 << 10, 1280 << 10, 30 << 20, "test"))  # 1.25 MiB: not a power of 2
    assert odd["elementwise"] == 1 << 17 and odd["upcast_few_rows"] == 2 << 20


@pytest.fixture
def unchosen(monkeypatch):
    monkeypatch.setattr(fast, "UPCAST_BLOCK_BYTES", None)
    monkeypatch.setattr(fast, "UPCAST_BLOCK_BYTES_MANY_ROWS", None)
    monkeypatch.setattr(fast, "_upcast_how", "not chosen yet")


def test_the_environment_fixes_the_widening_blocks(unchosen, monkeypatch):
    monkeypatch.setenv(fast.UPCAST_BLOCKS_ENV, "1M,3M")
    monkeypatch.setattr(fast, "_measure_block", lambda *a, **k: pytest.fail("measured although set"))
    assert fast.upcast_block_bytes(True) == 1 << 20 and fast.upcast_block_bytes(False) == 3 << 20
    assert fast.block_sizes()["upcast_how"] == f"set by {fast.UPCAST_BLOCKS_ENV}"


@pytest.mark.parametrize("setting", ["2M", "2M,x", "2M,8M,1M", "100,8M"])
def test_a_bad_setting_is_named(unchosen, monkeypatch, setting):
    monkeypatch.setenv(fast.UPCAST_BLOCKS_ENV, setting)
    with pytest.raises(ValueError, match=fast.UPCAST_BLOCKS_ENV + r".*FEW,MANY"):
        fast.upcast_block_bytes(True)


def test_measured_once_among_sizes_around_the_derived_one(unchosen, monkeypatch):
    monkeypatch.delenv(fast.UPCAST_BLOCKS_ENV, raising=False)
    calls = []
    real = fast._measure_block
    monkeypatch.setattr(fast, "_measure_block", lambda start, rows: calls.append(start) or real(start, rows, 1))
    few = fast.upcast_block_bytes(True)
    many = fast.upcast_block_bytes(False)
    assert fast.upcast_block_bytes(True) == few and len(calls) == 2  # chosen once for the process
    start_few, start_many = fast._DERIVED["upcast_few_rows"], fast._DERIVED["upcast_many_rows"]
    assert few in fast.upcast_block_candidates(start_few, few_rows=True)
    assert many in (start_many // 2, start_many, start_many * 2)
    info = fast.block_sizes()
    assert info["upcast_how"] == "measured at first use" and info["upcast_few_rows"] == few
    assert info["caches"]["l2"] == machine.cache_sizes().l2


def test_few_rows_try_every_power_of_two_from_the_smallest_up():
    smallest = fast.UPCAST_SMALLEST_FEW_ROWS_BLOCK
    assert fast.upcast_block_candidates(4 << 20, few_rows=True) == [
        4 << 20,
        2 << 20,
        1 << 20,
        512 << 10,
        256 << 10,
        8 << 20,
    ]
    assert fast.upcast_block_candidates(smallest, few_rows=True) == [smallest, 2 * smallest]
    assert fast.upcast_block_candidates(16 << 20, few_rows=False) == [16 << 20, 8 << 20, 32 << 20]


def test_block_size_does_not_change_the_product():
    """Blocks split the output columns, never a dot product: every size gives the textbook numbers (to float32
    summation order)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((300, 64), dtype=np.float32).astype(np.float16)
    ref = None
    for rows in (1, 20):
        x = rng.standard_normal((rows, 64), dtype=np.float32)
        ref = x @ w.astype(np.float32).T
        for block_bytes in (4 * 64, 4 * 64 * 7, 4 * 64 * 300):
            got = fast.linear_upcast_blocks(x, w, block_bytes=block_bytes)
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-5)  # float32 sums of 64 terms of ~1


# The per-row product's limit (fast.matvec_max_rows): set, or measured once per process


@pytest.fixture
def rows_unchosen(monkeypatch):
    monkeypatch.setattr(fast, "MATVEC_MAX_ROWS", None)
    monkeypatch.setattr(fast, "_matvec_how", "not chosen yet")


def test_the_environment_fixes_the_per_row_limit(rows_unchosen, monkeypatch):
    monkeypatch.setenv(fast.MATVEC_ROWS_ENV, "2")
    monkeypatch.setattr(fast, "_measure_matvec_rows", lambda *a, **k: pytest.fail("measured although set"))
    assert [fast.per_row(r) for r in range(6)] == [False, False, True, False, False, False]
    assert fast.block_sizes()["matvec_how"] == f"set by {fast.MATVEC_ROWS_ENV}"


def test_per_row_off_and_one_row_never_ask(rows_unchosen, monkeypatch):
    """One row, or more rows than could ever take the per-row form, decide nothing (no measurement)."""
    monkeypatch.setattr(fast, "_measure_matvec_rows", lambda *a, **k: pytest.fail("measured for nothing"))
    assert not fast.per_row(1) and not fast.per_row(0) and not fast.per_row(fast.MATVEC_CANDIDATE_ROWS + 1)
    monkeypatch.setenv(fast.MATVEC_ROWS_ENV, "1")
    assert not any(fast.per_row(r) for r in range(2, fast.MATVEC_CANDIDATE_ROWS + 1))


@pytest.mark.parametrize("setting", ["0", "-1", "two", "2.5"])
def test_a_bad_per_row_setting_is_named(rows_unchosen, monkeypatch, setting):
    monkeypatch.setenv(fast.MATVEC_ROWS_ENV, setting)
    with pytest.raises(ValueError, match=fast.MATVEC_ROWS_ENV + r".*positive int"):
        fast.per_row(2)


def test_per_row_limit_measured_once(rows_unchosen, monkeypatch):
    monkeypatch.delenv(fast.MATVEC_ROWS_ENV, raising=False)
    calls = []
    real = fast._measure_matvec_rows
    monkeypatch.setattr(fast, "_measure_matvec_rows", lambda: calls.append(1) or real(repeats=1))
    limit = fast.matvec_max_rows()
    fast.per_row(2), fast.per_row(3)
    assert 1 <= limit <= fast.MATVEC_CANDIDATE_ROWS and len(calls) == 1
    info = fast.block_sizes()
    assert info["matvec_how"] == "measured at first use" and info["matvec_max_rows"] == limit


def test_the_per_row_product_is_the_same_in_any_block():
    """Blocks split w's rows, never a dot product: every block size gives the products of the whole matrix."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 3, 64)).astype(np.float32)
    w = rng.standard_normal((300, 64)).astype(np.float32)
    whole = fast._matvec_per_row(x, w, block_bytes=4 * 64 * 300)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(whole, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    for block_bytes in (4 * 64, 4 * 64 * 7, 4 * 64 * 299, None):  # one row, 7 rows (not dividing 300), the default
        got = fast._matvec_per_row(x, w, block_bytes=block_bytes)
        assert got.shape == (1, 3, 300) and got.flags.c_contiguous
        np.testing.assert_allclose(got, whole, rtol=1e-6, atol=1e-6 * np.abs(whole).max())


@pytest.mark.parametrize("limit", ["1", "3"])
def test_either_form_gives_the_product(rows_unchosen, monkeypatch, limit):
    """Both forms of a 2-3-row product (and the MLP around them) give the float64 numbers to float32 rounding.
    (Weight first for more rows, so that the MLP and its composition take the same products, bit for bit.)"""
    monkeypatch.setenv(fast.MATVEC_ROWS_ENV, limit)
    monkeypatch.setenv(fast.PRODUCT_FORM_ENV, fast.WEIGHT_FIRST)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 1, 40)).astype(np.float32)
    w = rng.standard_normal((70, 40)).astype(np.float32)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(fast.linear(x, w), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    fc1 = {"weight": w, "bias": None}
    fc2 = {"weight": rng.standard_normal((40, 70)).astype(np.float32), "bias": None}
    composed = fast.linear(fast.gelu(fast.linear(x, **fc1)), **fc2)
    np.testing.assert_array_equal(fast.feed_forward(x, fc1, fc2, "gelu"), composed)


# --- weight first or x first (fast.product_form): measured per shape on the first calls, or fixed by the
# environment


@pytest.fixture
def forms_unchosen(monkeypatch):
    monkeypatch.delenv(fast.PRODUCT_FORM_ENV, raising=False)
    monkeypatch.setattr(fast, "_forms", {})
    monkeypatch.setattr(fast, "_form_trials", {})


def many_rows_case(rows=20, K=48, N=72):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, rows, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    ref = x.astype(np.float64) @ w.astype(np.float64).T + b
    return x, w, b, ref


def mlp_case(rows=13, C=40, F=96):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, rows, C)).astype(np.float32)
    fc1 = {"weight": rng.standard_normal((F, C)).astype(np.float32), "bias": rng.standard_normal(F).astype(np.float32)}
    fc2 = {"weight": rng.standard_normal((C, F)).astype(np.float32), "bias": rng.standard_normal(C).astype(np.float32)}
    norm = {"weight": rng.uniform(0.5, 1.5, F).astype(np.float32), "bias": rng.standard_normal(F).astype(np.float32)}
    ref = layers.feed_forward(x.astype(np.float64), fc1, fc2, "gelu", norm)
    return x, fc1, fc2, norm, ref


@pytest.mark.parametrize("form", [fast.WEIGHT_FIRST, fast.X_FIRST])
def test_the_environment_fixes_the_product_form(forms_unchosen, monkeypatch, form):
    monkeypatch.setenv(fast.PRODUCT_FORM_ENV, form)
    x, w, b, _ = many_rows_case()
    expected = fast._matmul_weight_first(x, w, b) if form == fast.WEIGHT_FIRST else x @ w.T + b
    for _ in range(2 * fast.FORM_TRIALS + 1):
        np.testing.assert_array_equal(fast.linear(x, w, b), expected)
    assert fast.product_form("linear", 20, 48, 72) == form
    assert fast.product_forms() == {"every shape": form} and fast._form_trials == {}


def test_a_bad_product_form_is_named(forms_unchosen, monkeypatch):
    monkeypatch.setenv(fast.PRODUCT_FORM_ENV, "columns")
    x, w, b, _ = many_rows_case()
    with pytest.raises(ValueError, match=fast.PRODUCT_FORM_ENV + r".*'weight-first' or 'x-first'.*'columns'"):
        fast.linear(x, w, b)


def test_each_shape_times_both_forms_then_keeps_one(forms_unchosen):
    x, w, b, ref = many_rows_case()
    key = ("linear", 32, 48, 72)  # 20 rows round up to 32
    for call in range(2 * fast.FORM_TRIALS + 2):
        got = fast.linear(x, w, b)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        assert (key in fast._forms) == (call >= 2 * fast.FORM_TRIALS - 1)
    assert [len(t) for t in fast._form_trials[key].values()] == [fast.FORM_TRIALS] * 2  # no timing once kept
    assert fast.product_form("linear", 17, 48, 72) == fast._forms[key]  # 17 rows share the shape
    assert fast.product_form("linear", 33, 48, 72) is None  # 33 do not
    assert fast.product_forms() == {"linear 32x48->72": fast._forms[key]}


@pytest.mark.parametrize("slower", [fast.WEIGHT_FIRST, fast.X_FIRST])
def test_the_faster_form_is_kept(forms_unchosen, slower):
    """The rule itself, on two forms of which one is made 20 ms slower."""

    def form(name):
        return lambda: time.sleep(0.02 if name == slower else 0.0) or name

    key = ("linear", 64, 8, 8)
    ran = [fast._in_measured_form(key, form(fast.WEIGHT_FIRST), form(fast.X_FIRST)) for _ in range(8)]
    w, x = fast.WEIGHT_FIRST, fast.X_FIRST
    assert ran[:6] == [w, x, x, w, w, x]  # in turns while measuring, ABBA: neither always takes the same turn
    faster = fast.X_FIRST if slower == fast.WEIGHT_FIRST else fast.WEIGHT_FIRST
    assert fast._forms[key] == faster and ran[-2:] == [faster, faster]


def test_the_mlp_gives_its_numbers_in_either_form(forms_unchosen):
    x, fc1, fc2, norm, ref = mlp_case(rows=20)
    for _ in range(2 * fast.FORM_TRIALS + 2):
        got = fast.feed_forward(x, fc1, fc2, "gelu", norm)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert ("mlp", 32, 40, 96) in fast._forms


def test_head_projection_times_both_forms_then_keeps_one(forms_unchosen):
    x, w, b, ref = many_rows_case()
    for _ in range(2 * fast.FORM_TRIALS + 2):
        got = fast.head_projection(x, w, b, 6)
        np.testing.assert_allclose(got, layers.split_heads(ref, 6), rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    key = ("heads", 32, 48, 72)  # its own choice, beside the plain product's
    assert [len(t) for t in fast._form_trials[key].values()] == [fast.FORM_TRIALS] * 2
    assert fast.product_forms()["heads 32x48->72"] == fast._forms[key]


# --- ragged rows padded to a multiple of fast.ROWS_MULTIPLE (fast._in_padded_rows): measured per shape once its
# form is kept, or fixed by the environment


@pytest.fixture
def paddings_unchosen(forms_unchosen, monkeypatch):
    monkeypatch.delenv(fast.PAD_ROWS_ENV, raising=False)
    monkeypatch.setattr(fast, "_paddings", {})
    monkeypatch.setattr(fast, "_padding_trials", {})


@pytest.mark.parametrize("form", [fast.WEIGHT_FIRST, fast.X_FIRST])
def test_padded_rows_give_the_rows_products(paddings_unchosen, monkeypatch, form):
    monkeypatch.setenv(fast.PAD_ROWS_ENV, "on")
    monkeypatch.setenv(fast.PRODUCT_FORM_ENV, form)
    x, w, b, ref = many_rows_case(rows=13)  # 13 rows: 3 rows of zeros make 16
    got = fast.linear(x, w, b)
    assert got.shape == (1, 13, 72) and got.flags.c_contiguous
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    monkeypatch.setenv(fast.PAD_ROWS_ENV, "off")
    np.testing.assert_allclose(got, fast.linear(x, w, b), rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    x, fc1, fc2, norm, ref = mlp_case()
    for setting in ("on", "off"):
        monkeypatch.setenv(fast.PAD_ROWS_ENV, setting)
        got = fast.feed_forward(x, fc1, fc2, "gelu", norm)
        assert got.shape == x.shape and got.flags.c_contiguous, setting
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert fast.row_paddings() == {"every shape": fast.AS_IS} and fast._padding_trials == {}


def test_a_ragged_shape_times_padding_once_its_form_is_kept(paddings_unchosen):
    x, w, b, ref = many_rows_case(rows=20)  # 20 rows: 24 padded
    key = ("linear", 20, 48, 72)
    forms = 2 * fast.FORM_TRIALS
    for call in range(forms + 2 * fast.PAD_TRIALS + 2):
        got = fast.linear(x, w, b)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        assert (key in fast._padding_trials) == (call >= forms), f"call {call}: padding timed before the form was kept"
        assert (key in fast._paddings) == (call >= forms + 2 * fast.PAD_TRIALS - 1)
    assert [len(t) for t in fast._padding_trials[key].values()] == [fast.PAD_TRIALS] * 2  # no timing once kept
    assert fast.row_paddings() == {"linear 20x48->72": fast._paddings[key]}
    assert fast.block_sizes()["row_paddings"] == fast.row_paddings()


def test_rows_already_a_multiple_are_never_padded(paddings_unchosen):
    x, w, b, _ = many_rows_case(rows=16)
    for _ in range(4 * fast.FORM_TRIALS):
        fast.linear(x, w, b)
    assert fast._padding_trials == {} and fast.row_paddings() == {}


def test_a_bad_padding_setting_is_named(paddings_unchosen, monkeypatch):
    monkeypatch.setenv(fast.PAD_ROWS_ENV, "yes")
    x, w, b, _ = many_rows_case(rows=13)
    with pytest.raises(ValueError, match=fast.PAD_ROWS_ENV + r" must be 'on' or 'off'.*got 'yes'"):
        fast.linear(x, w, b)


# --- keeping freed memory (machine.keep_freed_memory): each case in a fresh interpreter, since the setting is
# process-wide and cannot be undone

ALLOCATIONS = """
import resource, sys
import numpy as np
from kosmos2_ref import machine
applied = machine.keep_freed_memory() if sys.argv[1] == "keep" else None
def step():  # three 1 MB float32 arrays made and dropped, as each layer of a forward pass does
    a, b, c = (np.ones(1 << 18, np.float32) for _ in range(3))
    del a, b, c
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def minor_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", ALLOCATIONS, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


def test_kept_freed_memory_is_reused_without_page_faults():
    """glibc's defaults hand the dropped arrays' pages back and fault fresh ones in for the next (~15 thousand
    faults for these 60 MB); with the thresholds fixed the same pages are reused."""
    default_applied, default = minor_faults("default")
    kept_applied, kept = minor_faults("keep")
    print(f"minor page faults over 20 steps: glibc defaults {default}, freed memory kept {kept}")
    if platform.libc_ver()[0] != "glibc":  # nothing to set: the call says so and changes nothing
        assert kept_applied == "False"
        return
    assert kept_applied == "True" and default_applied == "None"
    assert kept <= 50
    assert default > 10 * max(kept, 1)


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "64M", 1 << 31])
def test_keep_freed_memory_names_a_bad_threshold(value):
    with pytest.raises(ValueError, match=r"trim_bytes=.*expected a positive whole number of bytes"):
        machine.keep_freed_memory(trim_bytes=value)
    with pytest.raises(ValueError, match=r"mmap_bytes=.*expected a positive whole number of bytes"):
        machine.keep_freed_memory(mmap_bytes=value)


CLI_RUN = """
from kosmos2_ref import cli, machine
status = cli.main(["caption", "/nonexistent/image.png"])
print(status, machine.freed_memory_kept())
"""


@pytest.mark.parametrize(
    "setting, kept",
    [(None, "{'trim_bytes': 67108864, 'mmap_bytes': 33554432}"), ("1", "{'trim_bytes': 67108864, "), ("0", "None")],
)
def test_the_command_line_keeps_freed_memory_unless_told_not_to(setting, kept):
    env = {k: v for k, v in os.environ.items() if k != "KOSMOS2_REF_KEEP_FREED_MEMORY"}
    if setting is not None:
        env["KOSMOS2_REF_KEEP_FREED_MEMORY"] = setting
    out = subprocess.run([sys.executable, "-c", CLI_RUN], capture_output=True, text=True, env=env, check=True)
    if platform.libc_ver()[0] != "glibc":
        kept = "None"
    assert out.stdout.startswith(f"2 {kept}"), out.stdout  # 2: the missing image, reported after the setting
    assert "image not found: '/nonexistent/image.png'" in out.stderr


def test_the_command_line_names_a_bad_keep_setting():
    env = {**os.environ, "KOSMOS2_REF_KEEP_FREED_MEMORY": "yes"}
    out = subprocess.run([sys.executable, "-c", CLI_RUN], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.startswith("2 None")
    assert "KOSMOS2_REF_KEEP_FREED_MEMORY='yes': expected 0 (glibc's defaults) or 1 (keep freed memory)" in out.stderr
