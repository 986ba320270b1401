"""``kosmos2-ref serve``: the web page and its JSON API on the standard library's HTTP server.

No framework: ``http.server.ThreadingHTTPServer`` (a thread per connection) in front of one
:class:`~kosmos2_ref.service.ModelService`, which lets one request at a time use the model and refuses requests
beyond a small queue with 503. The page (``kosmos2_ref/web/``) is three static files; every other path is 404,
so no request can name a file of its own choosing. docs/web.md lists the API.

    GET  /                       the page (and /app.js, /style.css, /samples/two_dogs.jpg)
    GET  /api/info               the model, its grid sizes, the limits
    POST /api/images             body: the bytes of an image file -> {"image_id", "width", "height"}
    POST /api/caption            {"image_id", "prompt"?, "max_new_tokens"?}; ?stream=1: server-sent events
    POST /api/ground             {"image_id", "phrase", "max_new_tokens"?}
    POST /api/describe           {"image_id", "box": [x1, y1, x2, y2], "max_new_tokens"?}
    GET  /api/attention?image_id=ID              the connector's attention, [64][256]
    GET  /api/heatmap?image_id=ID&query=Q        one latent query's heat map (PNG)
    GET  /api/scene.png?seed=N                   a scene of the synthetic world the miniature was trained on (PNG)

Every error is a JSON object ``{"error": "..."}`` with a 4xx/5xx status; the server keeps serving.
"""

from __future__ import annotations

import io
import ipaddress
import json
import signal
import socket
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from . import world
from .service import MAX_UPLOAD_BYTES, ModelService, RequestError

PACKAGE = Path(__file__).resolve().parent
WEB = PACKAGE / "web"
# The only files the server sends: URL path -> (file, Content-Type). Nothing is looked up from the URL itself.
STATIC = {
    "/": (WEB / "index.html", "text/html; charset=utf-8"),
    "/index.html": (WEB / "index.html", "text/html; charset=utf-8"),
    "/app.js": (WEB / "app.js", "text/javascript; charset=utf-8"),
    "/style.css": (WEB / "style.css", "text/css; charset=utf-8"),
    "/samples/two_dogs.jpg": (PACKAGE / "assets" / "two_dogs.jpg", "image/jpeg"),
}
MAX_JSON_BYTES = 64 * 1024
SOCKET_TIMEOUT_S = 60  # a client that stops sending mid-request frees its thread after this


class ClientGone(Exception):
    """The browser closed the connection (a new caption, a closed tab): stop quietly."""


# ----------------------------------------------------------------------------------------------------------------
# The request handler


class Handler(BaseHTTPRequestHandler):
    """One request: route it, run it, answer JSON (or a static file, a PNG, an event stream)."""

    server_version = "kosmos2-ref"
    protocol_version = "HTTP/1.0"  # one request per connection: an event stream ends when it closes
    timeout = SOCKET_TIMEOUT_S

    # ------------------------------------------------------------------------------------------------ answers
    @property
    def service(self) -> ModelService:
        return self.server.service

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, obj, extra: dict | None = None) -> None:
        self._send(
            status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8", extra
        )

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a malformed request line, an unknown method) as JSON too."""
        try:
            self.send_json(code, {"error": message or self.responses.get(code, ("error",))[0]})
        except OSError:
            pass

    def log_message(self, format, *args):
        if not self.server.quiet:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    # ------------------------------------------------------------------------------------------------ reading
    def _query(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}

    def _body(self, limit: int) -> bytes:
        """The request body, at most ``limit`` bytes (411 without a length, 413 over the limit)."""
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("the request needs a Content-Length header (a body of known size)", 411)
        try:
            n = int(length)
        except ValueError:
            raise RequestError(f"Content-Length {length!r} is not a number") from None
        if n < 0:
            raise RequestError(f"Content-Length {n} is negative")
        if n > limit:
            self._discard(n)
            raise RequestError(f"the request body is {n:,} bytes; the limit is {limit:,}", 413)
        data = self.rfile.read(n)
        if len(data) != n:
            raise RequestError(f"the request body ended after {len(data)} of {n} bytes")
        return data

    def _discard(self, n: int) -> None:
        """Read and drop an oversized body (up to 64 MiB), so the client is listening when the 413 comes;
        beyond that the connection is simply closed."""
        left = n if n <= 64 * 1024 * 1024 else 0
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)

    def _json_body(self, allowed: set[str], required: set[str]) -> dict:
        data = self._body(MAX_JSON_BYTES)
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(
                f'the request body is not valid JSON ({exc}); expected an object such as {{"image_id": "..."}}'
            ) from None
        if not isinstance(obj, dict):
            raise RequestError(f"the request body must be a JSON object, got a JSON {type(obj).__name__}")
        unknown = sorted(set(obj) - allowed)
        if unknown:
            raise RequestError(f"unknown field(s) {unknown}; this endpoint takes {sorted(allowed)}")
        missing = sorted(required - set(obj))
        if missing:
            raise RequestError(f"missing field(s) {missing}")
        return obj

    # ------------------------------------------------------------------------------------------------ routing
    def do_GET(self):
        self._dispatch(
            {
                "/api/info": self.api_info,
                "/api/attention": self.api_attention,
                "/api/heatmap": self.api_heatmap,
                "/api/scene.png": self.api_scene,
            }
        )

    do_HEAD = do_GET

    def do_POST(self):
        self._dispatch(
            {
                "/api/images": self.api_images,
                "/api/caption": self.api_caption,
                "/api/ground": self.api_ground,
                "/api/describe": self.api_describe,
            }
        )

    def _not_allowed(self):
        self.send_json(
            405, {"error": f"method {self.command} is not allowed; use GET or POST"}, {"Allow": "GET, HEAD, POST"}
        )

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def _check_origin(self) -> None:
        """On a loopback address, answer only requests addressed to this machine by name (the Host header) and
        sent from this page (the Origin header, which browsers add to cross-site requests): a web page elsewhere
        can then neither read the API through a DNS name that points at 127.0.0.1 nor make the browser run the
        model for it."""
        allowed = self.server.allowed_hosts
        if allowed is None:  # --host chose to serve the network: its own choice
            return
        host = self.headers.get("Host", "")
        if host not in allowed:
            raise RequestError(
                f"requests must be addressed to this machine (Host {sorted(allowed)[0]!r} or "
                f"similar), not {host[:100]!r}",
                403,
            )
        origin = self.headers.get("Origin")
        if origin is not None and origin.removeprefix("http://") not in allowed:
            raise RequestError(f"requests from another site ({origin[:100]!r}) are refused", 403)

    def _dispatch(self, routes: dict) -> None:
        path = urlsplit(self.path).path
        try:
            self._check_origin()
            if path in routes:
                routes[path]()
            elif self.command in ("GET", "HEAD") and path in STATIC:
                file, content_type = STATIC[path]
                self._send(200, file.read_bytes(), content_type)
            elif path in STATIC or path in self.server.all_routes:
                self._not_allowed()
            else:
                self.send_json(404, {"error": f"no such page or endpoint: {path[:200]!r} (see GET /api/info)"})
        except RequestError as exc:
            self._answer_error(exc.status, str(exc))
        except (ClientGone, BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except ValueError as exc:  # the library refused an input (its messages name it)
            self._answer_error(400, " ".join(str(exc).split())[:500])
        except Exception as exc:  # a bug: say so, log it, keep serving
            traceback.print_exc(file=sys.stderr)
            self._answer_error(500, f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")

    def _answer_error(self, status: int, message: str) -> None:
        if getattr(self, "_streaming", False):  # headers are out: report it as the stream's last event
            try:
                self._event("error", {"error": message, "status": status})
            except (ClientGone, OSError):
                pass
            return
        extra = {"Retry-After": "2"} if status == 503 else None
        try:
            self.send_json(status, {"error": message}, extra)
        except OSError:
            self.close_connection = True

    # ------------------------------------------------------------------------------------------------ endpoints
    def api_info(self):
        self.send_json(200, {**self.service.info(), "max_upload_bytes": self.server.max_upload_bytes})

    def api_images(self):
        data = self._body(self.server.max_upload_bytes)
        self.send_json(200, self.service.upload(data, self.server.max_upload_bytes))

    def api_caption(self):
        obj = self._json_body({"image_id", "prompt", "max_new_tokens"}, {"image_id"})
        stream = self._query().get("stream") in ("1", "true") or "text/event-stream" in self.headers.get("Accept", "")
        emit = self._event if stream else None
        result = self.service.caption(obj["image_id"], obj.get("prompt"), obj.get("max_new_tokens"), emit)
        if stream:
            self._event("done", result)
        else:
            self.send_json(200, result)

    def api_ground(self):
        obj = self._json_body({"image_id", "phrase", "max_new_tokens"}, {"image_id", "phrase"})
        self.send_json(200, self.service.ground(obj["image_id"], obj["phrase"], obj.get("max_new_tokens")))

    def api_describe(self):
        obj = self._json_body({"image_id", "box", "max_new_tokens"}, {"image_id", "box"})
        self.send_json(200, self.service.describe(obj["image_id"], obj["box"], obj.get("max_new_tokens")))

    def api_attention(self):
        self.send_json(200, self.service.attention(self._query().get("image_id")))

    def api_heatmap(self):
        q = self._query()
        self._send(200, self.service.heatmap_png(q.get("image_id"), q.get("query", "0")), "image/png")

    def api_scene(self):
        """A generated scene (kosmos2_ref.world, the miniature's training world) as a PNG; the page uploads it like
        any image. ``seed`` is a non-negative integer below 2**31 (the same seed gives the same scene)."""
        seed = self._query().get("seed", "0")
        if not seed.isdigit() or int(seed) >= 2**31:
            raise RequestError(f"seed must be a non-negative integer below 2**31, got {seed[:40]!r}")
        out = io.BytesIO()
        world.render(world.make_scene(int(seed))).save(out, format="PNG")
        self._send(200, out.getvalue(), "image/png")

    # ------------------------------------------------------------------------------------------------ streaming
    def _event(self, name: str, data: dict) -> None:
        """One server-sent event; the first one sends the headers of the stream."""
        if not getattr(self, "_streaming", False):
            self._streaming = True
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
        payload = json.dumps(data, ensure_ascii=False)
        try:
            self.wfile.write(f"event: {name}\ndata: {payload}\n\n".encode("utf-8"))
            self.wfile.flush()
        except OSError as exc:  # raised inside generate: it stops, and the model is free again
            raise ClientGone() from exc


# ----------------------------------------------------------------------------------------------------------------
# The server


class Kosmos2Server(ThreadingHTTPServer):
    """A thread per connection (daemon threads: Ctrl-C does not wait for a running caption)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 16
    all_routes = {
        "/api/info",
        "/api/attention",
        "/api/heatmap",
        "/api/scene.png",
        "/api/images",
        "/api/caption",
        "/api/ground",
        "/api/describe",
    }

    def __init__(self, address, service: ModelService, max_upload_bytes: int = MAX_UPLOAD_BYTES, quiet: bool = False):
        host = address[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.service = service
        self.max_upload_bytes = max_upload_bytes
        self.quiet = quiet
        super().__init__(address, Handler)
        port = self.server_address[1]
        # On loopback, the names this machine answers to (see Handler._check_origin); elsewhere, any.
        self.allowed_hosts = (
            {f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]")} if is_loopback(host) else None
        )

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    service: ModelService,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    quiet: bool = False,
    out=None,
) -> None:
    """Serve until Ctrl-C (or SIGTERM), then close the socket and return."""
    out = out or sys.stdout
    httpd = Kosmos2Server((host, port), service, max_upload_bytes, quiet)
    if not is_loopback(host):
        print(
            f"kosmos2-ref serve: WARNING: listening on {host}, not 127.0.0.1: anyone who can reach this machine "
            f"can use the model",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"kosmos2-ref serve: {service.name}{' (RANDOM weights)' if service.random_weights else ''} on "
        f"{httpd.url} (Ctrl-C stops it)",
        file=out,
        flush=True,
    )
    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM stops it as cleanly as Ctrl-C
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        print("kosmos2-ref serve: stopped", file=out, flush=True)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
