"""The web server's JSON API (``kosmos2-ref serve``), over real HTTP on 127.0.0.1, with the demo checkpoint.

Every bad input of issue #22 item 2 gets its status and a JSON error naming what was wrong, and the server is
asked after each one whether it still answers. The model has random weights: its captions are noise, so the
tests check structure and consistency (the streamed tokens are the returned tokens, concurrent requests get the
result one request alone gets), never the words.
"""

from __future__ import annotations

import io
import json
import signal
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import pytest
from web_server import SAMPLE, running_server

from kosmos2_ref import Kosmos2
from kosmos2_ref.demo import demo_checkpoint
from kosmos2_ref.server import is_loopback
from kosmos2_ref.service import Busy, ModelService

UPLOAD_LIMIT_MB = 1  # the server under test accepts uploads up to 1 MiB
GROUNDED_PROMPT = "<grounding> An image of<phrase> a dog</phrase><object><patch_index_0044><patch_index_0863></object>"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return demo_checkpoint(tmp_path_factory.mktemp("demo_cache"))


@pytest.fixture(scope="module")
def server(checkpoint):
    with running_server(checkpoint, "--max-upload-mb", str(UPLOAD_LIMIT_MB), "--queue", "2", "--quiet") as s:
        yield s


@pytest.fixture(scope="module")
def image_id(server):
    status, body = server.upload(SAMPLE.read_bytes())
    assert status == 200, body
    return body["image_id"]


def png_bytes(size=(64, 48), colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A tiny file that claims width × height pixels: a PNG signature, its IHDR chunk and an empty IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def parse_events(data: bytes) -> list[tuple[str, dict]]:
    events = []
    for block in data.decode("utf-8").split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields["event"], json.loads(fields["data"])))
    return events


# ----------------------------------------------------------------------------------------------------------------
# What works


def test_page_and_info(server):
    status, headers, body = server.request("GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"<script" in body
    status, info = server.json("GET", "/api/info")
    assert status == 200
    assert info["random_weights"] is True  # the demo checkpoint is labelled as random
    assert (info["latent_queries"], info["patch_grid"], info["location_grid"]) == (64, 16, 32)
    assert info["max_upload_bytes"] == UPLOAD_LIMIT_MB * 1024 * 1024


def test_upload_gives_the_image_size(server):
    status, body = server.upload(png_bytes((64, 48)))
    assert status == 200
    assert (body["width"], body["height"]) == (64, 48)
    assert server.upload(png_bytes((64, 48)))[1]["image_id"] == body["image_id"]  # same pixels, same id


def test_caption_json(server, image_id):
    status, r = server.json("POST", "/api/caption", {"image_id": image_id, "max_new_tokens": 8})
    assert status == 200, r
    assert len(r["generated_tokens"]) <= 8
    assert all(0.0 <= t["prob"] <= 1.0 for t in r["generated_tokens"])
    assert len(r["image_positions"]) == 64  # the 64 slots of the image embeddings
    prompt_tokens = [t["token"] for t in r["prompt_tokens"]]
    assert prompt_tokens[:2] == ["<s>", "<image>"] and "</image>" in prompt_tokens and "<grounding>" in prompt_tokens
    assert r["text"].startswith("<grounding> An image of")


def test_caption_stream_sends_each_token_as_it_is_made(server, image_id):
    status, headers, data = server.request(
        "POST",
        "/api/caption?stream=1",
        json.dumps({"image_id": image_id, "max_new_tokens": 6}).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = parse_events(data)
    names = [name for name, _ in events]
    assert names[0] == "prompt" and names[-1] == "done"
    streamed = [d["id"] for name, d in events if name == "token"]
    done = events[-1][1]
    assert streamed == [t["id"] for t in done["generated_tokens"]]  # what streamed is what was generated
    assert 1 <= len(streamed) <= 6


def test_a_grounded_phrase_in_the_prompt_comes_back_as_a_box(server, image_id):
    """Random weights rarely ground anything; a prompt that already holds a grounded phrase gives a known box
    (cells 44 = row 1, column 12 and 863 = row 26, column 31 of the 32 x 32 grid), whose location tokens were
    given, so it has no confidence."""
    status, r = server.json(
        "POST", "/api/caption", {"image_id": image_id, "prompt": GROUNDED_PROMPT, "max_new_tokens": 4}
    )
    assert status == 200, r
    dog = r["entities"][0]
    assert dog["phrase"] == "a dog"
    assert np.allclose(dog["boxes"][0], [12.5 / 32, 1.5 / 32, 31.5 / 32, 26.5 / 32])  # cell centres
    assert dog["confidence"]["boxes"][0]["probability"] is None


def test_ground_and_describe(server, image_id):
    status, g = server.json("POST", "/api/ground", {"image_id": image_id, "phrase": "  two   dogs "})
    assert status == 200, g
    assert g["phrase"] == "two dogs" and g["text"].startswith("<grounding><phrase> two dogs</phrase>")
    assert isinstance(g["boxes"], list)
    status, d = server.json(
        "POST", "/api/describe", {"image_id": image_id, "box": [0.25, 0.5, 0.75, 1.0], "max_new_tokens": 5}
    )
    assert status == 200, d
    assert d["box"] == [0.25, 0.5, 0.75, 1.0]
    assert d["entities"][0]["phrase"] == "It"  # the box given, as the prompt's <object>
    assert d["description"].startswith("It")


def test_attention_and_heatmap(server, image_id):
    status, a = server.json("GET", f"/api/attention?image_id={image_id}")
    assert status == 200
    weights = np.asarray(a["weights"])
    assert weights.shape == (64, 256) and (weights >= 0).all()
    assert (weights.sum(axis=1) <= 1 + 1e-4).all()  # a share of each query's attention (CLS, latents get the rest)
    status, headers, png = server.request("GET", f"/api/heatmap?image_id={image_id}&query=63")
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert PIL.Image.open(io.BytesIO(png)).size == (448, 448)


def test_a_generated_scene_is_the_world_s_scene_and_uploads(server):
    from kosmos2_ref import world

    status, headers, png = server.request("GET", "/api/scene.png?seed=7")
    assert status == 200 and headers["Content-Type"] == "image/png"
    expected = np.asarray(world.render(world.make_scene(7)))
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB")), expected)
    status, up = server.upload(png)
    assert status == 200 and (up["width"], up["height"]) == expected.shape[1::-1]
    for bad in ("-1", "x", "99999999999"):
        status, err = server.json("GET", f"/api/scene.png?seed={bad}")
        assert status == 400 and "seed" in err["error"], err
    assert server.json("GET", "/api/info")[0] == 200


# ----------------------------------------------------------------------------------------------------------------
# Bad input: a clear JSON error, and the server still answers afterwards


@pytest.mark.parametrize(
    "data, status, words",
    [
        (b"", 400, "empty"),
        (b"GIF89a but not really an image", 400, "not an image"),
        (b"<html><script>alert(1)</script></html>", 400, "not an image"),
        (png_bytes((300, 300))[:120], 400, "could not be decoded"),  # a PNG cut short
        (huge_png_header(9000, 9000), 413, "pixels"),  # 81 megapixels in 60 bytes
        (huge_png_header(20000, 20000), 413, "too large"),  # beyond Pillow's own bomb limit
        (b"\xff\xd8" + bytes(UPLOAD_LIMIT_MB * 1024 * 1024), 413, "limit"),  # over the upload limit
    ],
)
def test_bad_uploads(server, data, status, words):
    got, body = server.upload(data)
    assert got == status, body
    assert words in body["error"]
    assert server.alive()


def test_upload_without_length(server):
    """A body of unknown length (http.client always sends one, so the request is written by hand)."""
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        sock.sendall(f"POST /api/images HTTP/1.0\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
        reply = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split()[1] == b"411", head
    assert "Content-Length" in json.loads(body)["error"]
    assert server.alive()


@pytest.mark.parametrize(
    "path",
    [
        "/../pyproject.toml",
        "/../../../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/..%2fserver.py",
        "/web/app.js",
        "/app.js/../../cli.py",
        "//etc/passwd",
        "/server.py",
        "/samples/../cli.py",
        "/samples/..%2f..%2fcli.py",
        "/assets/two_dogs.jpg",
        "/index.html%00.py",
    ],
)
def test_no_path_reaches_a_file_outside_the_fixed_set(server, path):
    status, _, body = server.request("GET", path)
    assert status == 404, (path, body[:200])
    assert "error" in json.loads(body)
    assert server.alive()


@pytest.mark.parametrize(
    "path, payload, status, words",
    [
        ("/api/caption", b"{not json", 400, "not valid JSON"),
        ("/api/caption", b"[1, 2]", 400, "JSON object"),
        ("/api/caption", b'{"image_id": "nope"}', 404, "not known"),
        ("/api/caption", b'{"image": "x"}', 400, "unknown field"),
        ("/api/caption", b'{"image_id": "IMAGE", "max_new_tokens": 100000}', 400, "max_new_tokens"),
        ("/api/caption", b'{"image_id": "IMAGE", "prompt": 7}', 400, "prompt"),
        ("/api/ground", b'{"image_id": "IMAGE"}', 400, "missing field"),
        ("/api/ground", b'{"image_id": "IMAGE", "phrase": "<object>"}', 400, "must not contain"),
        ("/api/describe", b'{"image_id": "IMAGE", "box": [0.5, 0.5, 0.2, 0.9]}', 400, "x2 > x1"),
        ("/api/describe", b'{"image_id": "IMAGE", "box": "0,0,1,1"}', 400, "four numbers"),
        ("/api/describe", b'{"image_id": "IMAGE", "box": [0, 0, 5000, 10]}', 400, "outside"),
    ],
)
def test_bad_requests(server, image_id, path, payload, status, words):
    got, body = server.json("POST", path, raw=payload.replace(b"IMAGE", image_id.encode()))
    assert got == status, body
    assert words in body["error"]
    assert server.alive()


@pytest.mark.parametrize(
    "headers, words",
    [
        ({"Host": "attacker.example:80"}, "addressed to this machine"),  # a DNS name pointed at 127.0.0.1
        ({"Origin": "http://attacker.example"}, "another site"),  # another page's fetch
    ],
)
def test_requests_from_elsewhere_are_refused(server, headers, words):
    status, body = server.json("GET", "/api/info", headers=headers)
    assert status == 403 and words in body["error"]
    status, body = server.json("POST", "/api/caption", {"image_id": "x"}, headers=headers)
    assert status == 403
    assert server.alive()


def test_bad_query_and_method(server, image_id):
    assert server.json("GET", f"/api/heatmap?image_id={image_id}&query=64")[0] == 400
    assert server.json("GET", f"/api/heatmap?image_id={image_id}&query=x")[0] == 400
    assert server.json("GET", "/api/attention")[0] == 400
    assert server.json("DELETE", "/api/images")[0] == 405
    assert server.json("GET", "/api/caption")[0] == 405
    assert server.alive()


def test_concurrent_requests_get_the_answer_one_request_alone_gets(server, image_id):
    """Eight captions at once on a server whose queue holds 2: each gets either the same caption as a request
    alone (greedy decoding is deterministic, so a race would show as a different answer) or a 503."""
    alone = server.json("POST", "/api/caption", {"image_id": image_id, "max_new_tokens": 12})[1]

    def one(_):
        return server.json("POST", "/api/caption", {"image_id": image_id, "max_new_tokens": 12})

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1
    for status, body in results:
        if status == 200:
            assert body["generated_tokens"] == alone["generated_tokens"]
        else:
            assert "busy" in body["error"]
    print(f"8 concurrent captions: {statuses.count(200)} answered, {statuses.count(503)} refused with 503")
    assert server.alive()


def test_a_browser_that_leaves_mid_stream_frees_the_model(server, image_id):
    """Close the connection after the first event of a long caption; the next request is answered in full."""
    body = json.dumps({"image_id": image_id, "max_new_tokens": 128}).encode()
    with socket.create_connection((server.host, server.port), timeout=60) as sock:
        sock.sendall(
            f"POST /api/caption?stream=1 HTTP/1.0\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        first = sock.recv(4096)
    assert b"event: prompt" in first or b"200" in first
    status, r = server.json("POST", "/api/caption", {"image_id": image_id, "max_new_tokens": 3})
    assert status == 200 and len(r["generated_tokens"]) == 3
    assert server.alive()


# ----------------------------------------------------------------------------------------------------------------
# The queue, in-process (no timing: the test holds the model itself)


def test_requests_beyond_the_queue_are_refused_at_once(checkpoint):
    service = ModelService(Kosmos2.from_pretrained(checkpoint), max_waiting=1)
    image_id = service.upload(png_bytes())["image_id"]
    waiting_done = threading.Event()

    def waiter():
        service.caption(image_id, max_new_tokens=2)
        waiting_done.set()

    with service.turn():  # the model is busy with "us"
        t = threading.Thread(target=waiter)
        t.start()
        deadline = time.monotonic() + 60
        while service.admitted < 2 and time.monotonic() < deadline:  # until the waiter has taken its place
            time.sleep(0.01)
        assert service.admitted == 2
        with pytest.raises(Busy, match="busy"):
            service.caption(image_id, max_new_tokens=2)
        assert not waiting_done.is_set()
    t.join(60)
    assert waiting_done.is_set()  # it ran once the model was free


# ----------------------------------------------------------------------------------------------------------------
# Starting and stopping


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_the_server_cleanly(checkpoint, how):
    with running_server(checkpoint, "--quiet") as s:
        assert s.alive()
        s.process.send_signal(how)
        assert s.process.wait(30) == 0
    assert any("stopped" in line for line in s.output), s.output


def test_max_new_tokens_sets_the_default_length(checkpoint):
    with running_server(checkpoint, "--quiet", "--max-new-tokens", "5") as s:
        image_id = s.upload(png_bytes())[1]["image_id"]
        status, r = s.json("POST", "/api/caption", {"image_id": image_id})
        assert status == 200 and len(r["generated_tokens"]) <= 5
        assert s.json("GET", "/api/info")[1]["default_max_new_tokens"] == 5


def test_bad_serve_options_are_one_line_errors(checkpoint, capsys):
    from kosmos2_ref.cli import main

    assert main(["serve", "--model", str(checkpoint), "--port", "70000"]) == 2
    assert "--port must be from 0 to 65535" in capsys.readouterr().err


def test_loopback_names():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
