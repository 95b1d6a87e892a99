"""Shared by tests/test_images.py and tests/test_netguard.py: loopback HTTP servers playing Label Studio and
image hosts, image bytes, JWTs, an ImageFetcher factory, and a guard that fails any test sending a DNS query.

Everything listens on loopback, which the default policy refuses (except the Label Studio host). Tests that need a
"public" host inject an address policy (and, for host names, a resolver) that counts a loopback server as public.
Private targets (10.x, 169.254.169.254, ...) are refused before any connection, so no packet leaves the machine.
"""

from __future__ import annotations

import base64
import contextlib
import io
import ipaddress
import json
import select
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
from PIL import Image

from backend.images import FetchSettings, ImageFetcher, ImageFetchError, address_problem

LEGACY = "0123456789abcdef0123456789abcdef01234567"


def _b64url(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


def jwt(**claims: object) -> str:
    """An unsigned-looking JWT: the fetcher never verifies signatures, Label Studio does."""
    return f"{_b64url({'alg': 'HS256', 'typ': 'JWT'})}.{_b64url(claims)}.c2ln"


PAT = jwt(token_type="refresh", jti="pat1", exp=int(time.time()) + 86400)


def png(width: int = 32, height: int = 24, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def jpeg(width: int = 40, height: int = 20, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.effect_noise((width, height), 40).convert("RGB").save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG with only IHDR and IEND: it announces width x height but has no pixel data to decode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


IMAGE = png()

Handler = Callable[[BaseHTTPRequestHandler], None]


def reply(h: BaseHTTPRequestHandler, status: int = 200, body: bytes = b"", **headers: str) -> None:
    h.send_response(status)
    for name, value in headers.items():
        h.send_header(name.replace("_", "-"), value)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


class Server:
    """A threaded HTTP server on a free loopback port; ``routes`` maps a path (no query) to a handler."""

    def __init__(self, tls: tuple[str, str] | None = None) -> None:
        self.routes: dict[str, Handler] = {}
        self.fallback: Handler | None = None  # for paths without a route (else 404)
        self.log: list[tuple[str, str, dict[str, str]]] = []
        self.stop = threading.Event()
        server = self

        class H(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                server.log.append((self.command, self.path, dict(self.headers.items())))
                route = server.routes.get(urlsplit(self.path).path) or server.fallback
                with contextlib.suppress(OSError):  # the client hung up, as intended in several tests
                    route(self) if route else reply(self, 404, b"not found")

            do_GET = do_POST = _serve

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        if tls:  # handshake failures surface in accept(), which the server ignores quietly
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def requests(self, method: str = "GET") -> list[tuple[str, dict[str, str]]]:
        return [(path, headers) for m, path, headers in self.log if m == method]

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class ImageHost(Server):
    """An image host on loopback: ``/fast/<name>.png`` answers at once, ``/slow/<name>.png`` sends its headers and
    then one byte a second (a slow-loris host: the body never completes within a fetch deadline). Counts fetches:
    ``open`` now, ``max_open`` at once, ``closed`` ended, ``gets`` per path. ``png(name)`` is the image of a name
    (distinct per name, so each has its own content hash)."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.open = self.max_open = self.closed = 0
        self.gets: dict[str, int] = {}
        self.fallback = self._serve_image

    @staticmethod
    def png(name: str) -> bytes:
        return png(40, 30, (len(name) * 37 % 256, sum(map(ord, name)) % 256, 90))

    def _serve_image(self, h: BaseHTTPRequestHandler) -> None:
        path = urlsplit(h.path).path
        kind, _, name = path.strip("/").partition("/")
        if kind not in ("fast", "slow"):
            return reply(h, 404, b"not found")
        body = self.png(name)
        with self.lock:
            self.gets[path] = self.gets.get(path, 0) + 1
            self.open += 1
            self.max_open = max(self.max_open, self.open)
        try:
            if kind == "fast":
                return reply(h, 200, body, Content_Type="image/png")
            h.send_response(200)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            for byte in body:
                readable, _, _ = select.select([h.connection], [], [], 1.0)
                if self.stop.is_set() or (readable and not h.connection.recv(1, socket.MSG_PEEK)):
                    return  # shut down, or the client hung up (noticed at once, so `open` is exact)
                if readable:
                    self.stop.wait(1.0)
                h.wfile.write(bytes([byte]))
                h.wfile.flush()
        finally:
            with self.lock:
                self.open -= 1
                self.closed += 1


@pytest.fixture
def no_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test that would send a DNS query: only IP literals and localhost may be resolved here."""
    real = socket.getaddrinfo

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
        name = host.decode() if isinstance(host, bytes) else str(host)
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(name.split("%")[0])
            name = "localhost"
        assert name == "localhost" or name.isdigit(), f"the test tried to resolve {name!r} in DNS"
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def ls() -> Iterator[Server]:
    server = Server()
    yield server
    server.close()


@pytest.fixture
def ext() -> Iterator[Server]:
    server = Server()
    yield server
    server.close()


def public(ip: object) -> None:
    """Address policy for tests: every address is public (so loopback test servers stand in for the internet)."""
    return None


def only_loopback_public(ip: object) -> str | None:
    return None if str(ip) == "127.0.0.1" else address_problem(ip)  # type: ignore[arg-type]


def fetcher(ls: Server | None, key: str = LEGACY, **kw: object) -> ImageFetcher:
    policy = kw.pop("policy", address_problem)
    resolver = kw.pop("resolver", None)
    settings = FetchSettings(label_studio_url=ls.url if ls else "", api_key=key, **kw)  # type: ignore[arg-type]
    extra = {"resolver": resolver} if resolver else {}
    return ImageFetcher(settings, policy=policy, **extra)  # type: ignore[arg-type]


def refused(f: ImageFetcher, value: object, code: str, *words: str, task_id: int | None = None) -> str:
    with pytest.raises(ImageFetchError) as info:
        f.fetch(value, task_id)
    message = str(info.value)
    assert info.value.code == code, message
    for word in words:
        assert word in message, message
    return message


def authed(token: str, body: bytes = IMAGE) -> Handler:
    def handle(h: BaseHTTPRequestHandler) -> None:
        ok = h.headers.get("Authorization") == token
        reply(h, 200 if ok else 401, body if ok else b'{"detail":"no"}')

    return handle
