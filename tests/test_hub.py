"""Finding checkpoints: local folders, the Hugging Face cache layout, the offline path and the download path.

The cache is a fake one in a temp folder (HF_HUB_CACHE), laid out as huggingface_hub writes it: blobs named by
hash, snapshots of symlinks, refs/main naming the snapshot. Nothing here touches the network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from kosmos2_ref import Kosmos2, hub
from kosmos2_ref.hub import CheckpointNotFoundError, resolve_checkpoint

REPO = "microsoft/kosmos-2-patch14-224"
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test sees the machine's real cache, proxy or offline settings."""
    for var in (
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_HOME",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_ENDPOINT",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def make_snapshot(
    cache: Path,
    source: Path,
    commit: str,
    repo: str = REPO,
    files=None,
    ref: str | None = "main",
    mtime: float | None = None,
) -> Path:
    """Put ``source``'s files into ``cache`` as a huggingface_hub snapshot (blobs + symlinks)."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(source.iterdir()):
        if files is not None and f.name not in files:
            continue
        blob = repo_dir / "blobs" / f"{commit}-{f.name}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    if ref is not None:
        (repo_dir / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    if mtime is not None:
        os.utime(snap, (mtime, mtime))
    return snap


# ---------------------------------------------------------------------------------------------- local folders


def test_local_folder(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    assert resolve_checkpoint(folder) == folder
    assert resolve_checkpoint(str(folder)) == folder


def test_local_folder_errors(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointNotFoundError, match="has no config.json"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointNotFoundError, match="is a file"):
        resolve_checkpoint(tmp_path / "file")
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        resolve_checkpoint("./not/here")


@pytest.mark.parametrize("path", [None, 3, b"models/x"])
def test_path_must_be_a_str_or_path(path):
    with pytest.raises(CheckpointNotFoundError, match=rf"must be a folder path or a Hub id .*, got {path!r}"):
        Kosmos2.from_pretrained(path)


def test_is_hub_id():
    assert hub.is_hub_id(REPO)
    assert hub.is_hub_id("org/name.v2")
    for s in ("/abs/path", "./rel/path", "a/b/c", "..", "../x", "name", "~/x", "a/../b"):
        assert not hub.is_hub_id(s), s


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub.hub_cache_dir() == tmp_path / "cache"


# ---------------------------------------------------------------------------------------------- the cache


def test_hub_id_found_in_cache_and_loads(tiny_checkpoint, tmp_path, monkeypatch):
    folder, _ = tiny_checkpoint
    cache = tmp_path / "hf"
    snap = make_snapshot(cache, folder, "a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # found locally: the network is never needed
    assert resolve_checkpoint(REPO) == snap
    model = Kosmos2.from_pretrained(REPO)
    ref = Kosmos2.from_pretrained(folder)
    key = "image_to_text_projection"
    np.testing.assert_array_equal(model.params[key]["latent_query"], ref.params[key]["latent_query"])
    assert model.name_or_path == REPO


def test_refs_main_wins_over_newer_snapshot(tiny_checkpoint, tmp_path, monkeypatch):
    folder, _ = tiny_checkpoint
    cache = tmp_path / "hf"
    main = make_snapshot(cache, folder, "1" * 40, mtime=1_000_000)
    make_snapshot(cache, folder, "2" * 40, ref=None, mtime=2_000_000)  # newer, but not main
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_checkpoint(REPO) == main


def test_newest_complete_snapshot_without_refs(tiny_checkpoint, tmp_path, monkeypatch):
    folder, _ = tiny_checkpoint
    cache = tmp_path / "hf"
    make_snapshot(cache, folder, "1" * 40, ref=None, mtime=1_000_000)
    newest = make_snapshot(cache, folder, "2" * 40, ref=None, mtime=2_000_000)
    make_snapshot(cache, folder, "3" * 40, ref=None, files={"config.json"}, mtime=3_000_000)  # incomplete
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_checkpoint(REPO) == newest


def test_incomplete_main_falls_back_to_complete_snapshot(tiny_checkpoint, tmp_path, monkeypatch):
    folder, _ = tiny_checkpoint
    cache = tmp_path / "hf"
    full = make_snapshot(cache, folder, "1" * 40, ref=None)
    make_snapshot(cache, folder, "2" * 40, files={"config.json"})  # main, but without weights
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_checkpoint(REPO) == full


def test_revision(tiny_checkpoint, tmp_path, monkeypatch):
    folder, _ = tiny_checkpoint
    cache = tmp_path / "hf"
    main = make_snapshot(cache, folder, "1" * 40)
    pr = make_snapshot(cache, folder, "2" * 40, ref="refs/pr/1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_checkpoint(REPO, revision="refs/pr/1") == pr
    assert resolve_checkpoint(REPO, revision="1" * 40) == main
    with pytest.raises(CheckpointNotFoundError, match="revision 'v9'"):
        resolve_checkpoint(REPO, revision="v9", local_files_only=True)


def test_sharded_snapshot_needs_every_shard(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}'
    )
    (src / "model-00001-of-00002.safetensors").write_bytes(b"x")
    cache = tmp_path / "hf"
    snap = make_snapshot(cache, src, "1" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError, match="without model-00002-of-00002.safetensors"):
        resolve_checkpoint(REPO)
    (src / "model-00002-of-00002.safetensors").write_bytes(b"y")
    blob = cache / f"models--{REPO.replace('/', '--')}" / "blobs" / "shard2"
    shutil.copyfile(src / "model-00002-of-00002.safetensors", blob)
    (snap / "model-00002-of-00002.safetensors").symlink_to(blob)
    assert resolve_checkpoint(REPO) == snap


# ---------------------------------------------------------------------------------------------- offline


def _one_sentence(msg: str) -> None:
    assert "\n" not in msg and "Traceback" not in msg
    assert msg.count(". ") == 0, msg  # one sentence: no full stop inside


def test_offline_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    called = []
    monkeypatch.setattr(hub, "download", lambda *a, **k: called.append(1))
    with pytest.raises(CheckpointNotFoundError) as info:
        resolve_checkpoint(REPO)
    msg = str(info.value)
    _one_sentence(msg)
    assert REPO in msg and "HF_HUB_OFFLINE=1" in msg and f"hf download {REPO}" in msg
    assert str(tmp_path / "empty") in msg
    assert not called


def test_offline_partial_snapshot_names_missing_weights(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    cache = tmp_path / "hf"
    make_snapshot(cache, src, "1" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(CheckpointNotFoundError, match="without model.safetensors.*local_files_only=True"):
        resolve_checkpoint(REPO, local_files_only=True)


def test_offline_cli_one_line_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("KOSMOS2_REF_MODEL", None)
    from fixtures_tokenizer import IMAGES

    image = str(IMAGES / "two_dogs.jpg")
    proc = subprocess.run(
        [sys.executable, "-m", "kosmos2_ref", "caption", image],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kosmos2-ref: error: ") and REPO in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]


# ---------------------------------------------------------------------------------------------- download


class FakeHub:
    """Stands in for huggingface_hub.model_info and snapshot_download: records the download, writes a snapshot."""

    def __init__(self, source: Path | None, error: Exception | None = None):
        self.source, self.error, self.calls = source, error, []

    def model_info(self, repo_id, **kwargs):
        assert kwargs["timeout"] <= 30
        return types.SimpleNamespace(sha="f" * 40)

    def snapshot_download(self, repo_id, **kwargs):
        self.calls.append((repo_id, kwargs))
        if self.error is not None:
            raise self.error
        return str(make_snapshot(Path(kwargs["cache_dir"]), self.source, "f" * 40, repo=repo_id))


def _install_fake(monkeypatch, fake, reachable=(True, "")):
    module = types.ModuleType("huggingface_hub")
    module.model_info = fake.model_info
    module.snapshot_download = fake.snapshot_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)
    monkeypatch.setattr(hub, "_endpoint_reachable", lambda *a, **k: reachable)


def test_download_when_not_cached(tiny_checkpoint, tmp_path, monkeypatch):
    folder, _ = tiny_checkpoint
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    fake = FakeHub(folder)
    _install_fake(monkeypatch, fake)
    got = resolve_checkpoint(REPO)
    assert got.parent.name == "snapshots" and (got / "model.safetensors").is_file()
    ((repo_id, kwargs),) = fake.calls
    assert repo_id == REPO
    assert kwargs["cache_dir"] == str(tmp_path / "hf")
    assert kwargs["etag_timeout"] <= 30
    patterns = kwargs["allow_patterns"]
    for name in (
        "config.json",
        "generation_config.json",
        "*.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "preprocessor_config.json",
        "processor_config.json",
        "sentencepiece.bpe.model",
    ):
        assert name in patterns
    assert not any(p.endswith(".bin") for p in patterns)
    # now cached: a second call does not download
    assert resolve_checkpoint(REPO) == got and len(fake.calls) == 1


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts connections and never answers (a Hub endpoint that hangs)."""

    def __init__(self):
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held = []  # accepted connections, kept open and unanswered
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:  # closed
                return

    def close(self):
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.mark.parametrize("proxy", [False, True])
def test_a_hub_that_never_answers_fails_in_one_line(tmp_path, proxy):
    """The endpoint accepts the connection (the reachability probe passes, or is skipped behind a proxy) and then
    says nothing: the command fails with one line, well before the subprocess limit (the metadata request used to
    wait forever)."""
    pytest.importorskip("huggingface_hub")
    from fixtures_tokenizer import IMAGES

    server = SilentServer()
    try:
        endpoint = f"http://127.0.0.1:{server.port}"
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env.update(
            HF_HUB_CACHE=str(tmp_path / "empty"),
            HF_ENDPOINT=endpoint,
            PYTHONPATH=str(REPO_ROOT),
            NO_PROXY="",
            HF_HUB_DISABLE_TELEMETRY="1",
        )
        env.pop("KOSMOS2_REF_MODEL", None)
        if proxy:  # the probe is skipped; the http:// endpoint itself is still reached directly
            env["HTTPS_PROXY"] = endpoint
        t = time.monotonic()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "kosmos2_ref",
                "caption",
                str(IMAGES / "two_dogs.jpg"),
                "--model",
                "org/never-answers",
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=90,
        )
        took = time.monotonic() - t
    finally:
        server.close()
    print(f"failed after {took:.1f} s: {proc.stderr.strip()}")
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("kosmos2-ref: downloading")]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kosmos2-ref: error: ") and "did not answer in time" in lines[0]
    assert endpoint in lines[0] and "org/never-answers" in lines[0]


@pytest.mark.parametrize(
    "error, expect",
    [
        (OSError("Connection reset by peer. Please retry. Or not."), "downloading it failed"),
        (type("RepositoryNotFoundError", (Exception,), {})("404 Client Error"), "check the id"),
    ],
)
def test_download_failure_is_one_sentence(tmp_path, monkeypatch, error, expect):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    _install_fake(monkeypatch, FakeHub(None, error))
    with pytest.raises(CheckpointNotFoundError, match=expect) as info:
        resolve_checkpoint(REPO)
    _one_sentence(str(info.value))


def test_unreachable_hub_does_not_call_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    fake = FakeHub(None)
    _install_fake(monkeypatch, fake, reachable=(False, "gaierror: Name or service not known"))
    with pytest.raises(CheckpointNotFoundError, match="cannot be reached") as info:
        resolve_checkpoint(REPO)
    _one_sentence(str(info.value))
    assert fake.calls == []


def test_missing_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    with pytest.raises(CheckpointNotFoundError, match=r"pip install 'kosmos2-ref\[hub\]'") as info:
        resolve_checkpoint(REPO)
    _one_sentence(str(info.value))


def test_reachability_probe_is_bounded(monkeypatch):
    """A closed port answers at once; a probe stuck in name resolution is abandoned after the timeout."""
    import socket

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    ok, why = hub._endpoint_reachable(timeout=1.0)
    assert not ok and why

    def stuck(*args, **kwargs):
        time.sleep(30)

    monkeypatch.setattr(socket, "create_connection", stuck)
    t = time.monotonic()
    ok, why = hub._endpoint_reachable(timeout=0.2)
    assert not ok and "no answer" in why
    assert time.monotonic() - t < 3.0


def test_proxy_skips_probe(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert hub._endpoint_reachable(timeout=0.1) == (True, "")


# ---------------------------------------------------------------------------------------------- a mistyped path

TYPO = "modles/kosmos2"  # meant ./models/kosmos2, but it reads as a Hub id


@pytest.mark.parametrize(
    "reachable, offline, expect",
    [
        ((True, ""), False, "is not a local folder and could not be fetched from the Hugging Face Hub"),
        (
            (False, "gaierror: Name or service not known"),
            False,
            "is neither a local folder nor in the Hugging Face cache",
        ),
        ((True, ""), True, "is neither a local folder nor in the Hugging Face cache"),
    ],
)
def test_mistyped_relative_path_says_no_such_local_folder(tmp_path, monkeypatch, reachable, offline, expect):
    """Online or not, the error says there is no local folder of that name, not only that the Hub lacks it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "kosmos2").mkdir(parents=True)  # the folder that was meant
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    not_found = type("RepositoryNotFoundError", (Exception,), {})("401 Client Error: Repository Not Found")
    _install_fake(monkeypatch, FakeHub(None, not_found), reachable=reachable)
    with pytest.raises(CheckpointNotFoundError) as info:
        Kosmos2.from_pretrained(TYPO)
    msg = str(info.value)
    _one_sentence(msg)
    assert msg.startswith(repr(TYPO)) and expect in msg, msg


# ---------------------------------------------------------------------------------------------- .bin, processor only


@pytest.fixture(scope="module")
def bin_only_folder(tiny_checkpoint, tmp_path_factory):
    """The tiny model as transformers 4.x saved it without safetensors: config.json + pytorch_model.bin."""
    import fixtures_model as fm

    folder = fm.save_bin_checkpoint(tiny_checkpoint[1], tmp_path_factory.mktemp("bin_only"))
    assert not list(folder.glob("*.safetensors*"))
    return folder


def test_bin_only_snapshot_is_found_in_the_cache_when_online(bin_only_folder, tiny_checkpoint, tmp_path, monkeypatch):
    """The cache's .bin-only snapshot is complete: it loads, online, without trying to download."""
    import fixtures_model as fm

    cache = tmp_path / "hf"
    snap = make_snapshot(cache, bin_only_folder, "b" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "download", lambda *a, **k: pytest.fail("must not download"))
    assert resolve_checkpoint(REPO) == snap
    model = Kosmos2.from_pretrained(REPO)
    ref = Kosmos2.from_pretrained(tiny_checkpoint[0])
    emb = np.random.default_rng(0).standard_normal((1, 64, 32)).astype(np.float32)
    ids, img = fm.image_prompt_ids([712, 1648], 64)
    kw = dict(input_ids=np.array([ids]), image_embeds_position_mask=np.array([img]), image_embeds=emb)
    assert np.array_equal(model(**kw).logits, ref(**kw).logits)


def test_processor_only_cache_loads_the_processor(tiny_checkpoint, tmp_path, monkeypatch):
    """A snapshot with the tokenizer and image files but no weights: the processor loads from it (the model does
    not, and says which files are missing)."""
    from kosmos2_ref.processing import Kosmos2Processor

    folder, _ = tiny_checkpoint
    cache = tmp_path / "hf"
    processor_files = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json"]
    make_snapshot(cache, folder, "c" * 40, files=processor_files)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = Kosmos2Processor.from_pretrained(REPO)
    ref = Kosmos2Processor.from_pretrained(folder)
    a, b = ours(text="<grounding> An image of"), ref(text="<grounding> An image of")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(
        CheckpointNotFoundError,
        match=r"without config\.json, model\.safetensors \(or "
        r"pytorch_model\.bin\)",
    ):
        Kosmos2.from_pretrained(REPO)


def test_weights_only_cache_does_not_satisfy_the_processor(tiny_checkpoint, tmp_path, monkeypatch):
    from kosmos2_ref.processing import Kosmos2Processor

    cache = tmp_path / "hf"
    make_snapshot(cache, tiny_checkpoint[0], "d" * 40, files=["config.json", "model.safetensors"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        CheckpointNotFoundError,
        match=r"without tokenizer\.json \(or sentencepiece\.bpe\.model\), "
        r"preprocessor_config\.json",
    ):
        Kosmos2Processor.from_pretrained(REPO)


class PatternHub(FakeHub):
    """A fake snapshot_download that, like the real one, fetches only the files its allow_patterns match."""

    def snapshot_download(self, repo_id, **kwargs):
        import fnmatch

        self.calls.append((repo_id, kwargs))
        files = [
            f.name for f in self.source.iterdir() if any(fnmatch.fnmatch(f.name, p) for p in kwargs["allow_patterns"])
        ]
        return str(make_snapshot(Path(kwargs["cache_dir"]), self.source, "f" * 40, repo=repo_id, files=files))


def test_download_fetches_the_bin_only_when_there_is_no_safetensors(bin_only_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    fake = PatternHub(bin_only_folder)
    _install_fake(monkeypatch, fake)
    got = resolve_checkpoint(REPO)
    assert (got / "pytorch_model.bin").is_file()
    (_, first), (_, second) = fake.calls
    assert not any(p.endswith(".bin") for p in first["allow_patterns"])
    assert second["allow_patterns"] == hub.BIN_PATTERNS


def test_download_with_safetensors_never_fetches_the_bin(tiny_checkpoint, bin_only_folder, tmp_path, monkeypatch):
    both = tmp_path / "both"
    shutil.copytree(tiny_checkpoint[0], both)
    shutil.copy(bin_only_folder / "pytorch_model.bin", both)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    fake = PatternHub(both)
    _install_fake(monkeypatch, fake)
    got = resolve_checkpoint(REPO)
    assert len(fake.calls) == 1 and not (got / "pytorch_model.bin").exists()


def test_processor_download_fetches_processor_files_only(tiny_checkpoint, tmp_path, monkeypatch):
    from kosmos2_ref.processing import Kosmos2Processor

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    fake = PatternHub(tiny_checkpoint[0])
    _install_fake(monkeypatch, fake)
    Kosmos2Processor.from_pretrained(REPO)
    ((_, kwargs),) = fake.calls
    assert kwargs["allow_patterns"] == hub.PROCESSOR_PATTERNS
