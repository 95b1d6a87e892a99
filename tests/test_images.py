"""backend.images against real HTTP servers on 127.0.0.1: one plays Label Studio, others play image hosts.

Everything listens on loopback, which the default policy refuses (except the Label Studio host). Tests that need a
"public" host inject an address policy (and, for host names, a resolver) that counts a loopback server as public.
Private targets (10.x, 169.254.169.254, ...) are refused before any connection, so no packet leaves the machine.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import ipaddress
import json
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from backend.images import FetchSettings, ImageFetcher, ImageFetchError, address_problem, inspect_image

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
        self.log: list[tuple[str, str, dict[str, str]]] = []
        self.stop = threading.Event()
        server = self

        class H(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                server.log.append((self.command, self.path, dict(self.headers.items())))
                route = server.routes.get(urlsplit(self.path).path)
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


@pytest.fixture(autouse=True)
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


# --- Label Studio paths and tokens ---------------------------------------------------------------------------


def test_upload_with_legacy_token(ls: Server) -> None:
    ls.routes["/data/upload/1/x.png"] = authed(f"Token {LEGACY}")
    got = fetcher(ls).fetch("/data/upload/1/x.png", 1)
    assert got.data == IMAGE and got.sha256 == hashlib.sha256(IMAGE).hexdigest()
    assert (got.format, got.width, got.height, got.source) == ("PNG", 32, 24, "/data/upload/1/x.png")


def test_local_files_and_old_upload_paths(ls: Server) -> None:
    def local(h: BaseHTTPRequestHandler) -> None:
        ok = parse_qs(urlsplit(h.path).query) == {"d": ["images/x.png"]} and h.headers["Authorization"]
        reply(h, 200 if ok else 404, IMAGE)

    ls.routes["/data/local-files/"] = local
    ls.routes["/data/upload/2/y.png"] = authed(f"Token {LEGACY}")
    f = fetcher(ls)
    assert f.fetch("/data/local-files/?d=images/x.png").data == IMAGE
    assert f.fetch("upload/2/y.png").data == IMAGE
    assert f.fetch(f"{ls.url}/data/upload/2/y.png").data == IMAGE  # absolute URL on the Label Studio host


def test_personal_access_token_is_exchanged_and_cached(ls: Server) -> None:
    access = jwt(token_type="access", exp=int(time.time()) + 300)

    def refresh(h: BaseHTTPRequestHandler) -> None:
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        ok = body == {"refresh": PAT}
        reply(h, 200 if ok else 401, json.dumps({"access": access}).encode(), Content_Type="application/json")

    ls.routes["/api/token/refresh"] = refresh
    ls.routes["/data/upload/1/x.png"] = authed(f"Bearer {access}")
    f = fetcher(ls, key=PAT)
    with ThreadPoolExecutor(8) as pool:  # concurrent requests share one exchange
        assert all(got.data == IMAGE for got in pool.map(lambda _: f.fetch("/data/upload/1/x.png"), range(8)))
    assert f.fetch("/data/upload/1/x.png").data == IMAGE
    assert len(ls.requests("POST")) == 1  # one exchange, then the cached access token
    assert all(PAT not in str(headers) for _, headers in ls.requests("GET"))


def test_expired_or_revoked_access_token_is_exchanged_again(ls: Server) -> None:
    issued: list[str] = []

    def refresh(h: BaseHTTPRequestHandler) -> None:
        # The first token is already expired; the second one is "revoked" after one use by the upload route.
        issued.append(jwt(token_type="access", n=len(issued), exp=int(time.time()) + (-5 if not issued else 300)))
        reply(h, 200, json.dumps({"access": issued[-1]}).encode())

    def upload(h: BaseHTTPRequestHandler) -> None:
        token = h.headers.get("Authorization", "").removeprefix("Bearer ")
        reply(h, 200 if token in issued and issued.index(token) != 1 else 401, IMAGE)  # the 2nd counts as revoked

    ls.routes["/api/token/refresh"] = refresh
    ls.routes["/data/upload/1/x.png"] = upload
    f = fetcher(ls, key=PAT)
    f.fetch("/data/upload/1/x.png")  # exchange #1 (expired at once, so not cached)
    f.fetch("/data/upload/1/x.png")  # exchange #2, answered 401 (revoked): exchange #3 and retry once
    assert [headers["Authorization"] for _, headers in ls.requests()] == [f"Bearer {t}" for t in issued]
    assert len(issued) == 3


def test_refused_personal_access_token(ls: Server) -> None:
    ls.routes["/api/token/refresh"] = lambda h: reply(h, 401, b'{"detail":"Token is blacklisted"}')
    refused(fetcher(ls, key=PAT), "/data/upload/1/x.png", "auth", "personal access token", "LABEL_STUDIO_API_KEY")


def test_label_studio_errors_are_explained(ls: Server) -> None:
    ls.routes["/data/upload/1/x.png"] = authed("Token someone-else")
    ls.routes["/data/upload/1/login.png"] = lambda h: reply(h, 302, Location="/user/login/?next=/data/upload/1/x")
    f = fetcher(ls)
    refused(f, "/data/upload/1/x.png", "auth", "Label Studio answered 401 for /data/upload/1/x.png",
            "LABEL_STUDIO_API_KEY")
    refused(f, "/data/upload/1/gone.png", "not_found", "answered 404 for /data/upload/1/gone.png", "no such file")
    refused(f, "/data/upload/1/login.png", "auth", "login page", "LABEL_STUDIO_API_KEY")
    refused(f, "s3://bucket/missing.png", "not_found", "s3://bucket/missing.png", "cloud storage", task_id=7)


def test_missing_or_unreachable_label_studio() -> None:
    refused(fetcher(None), "/data/upload/1/x.png", "config", "LABEL_STUDIO_URL is not set")
    with socket.socket() as s:  # a port nobody listens on: connection refused, at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    f = ImageFetcher(FetchSettings(label_studio_url=f"http://127.0.0.1:{port}", api_key=LEGACY))
    refused(f, "/data/upload/1/x.png", "unreachable", f"cannot reach Label Studio at http://127.0.0.1:{port}",
            "Connection refused", "LABEL_STUDIO_URL")
    no_key = ImageFetcher(FetchSettings(label_studio_url=f"http://127.0.0.1:{port}"))
    refused(no_key, "/data/upload/1/x.png", "config", "LABEL_STUDIO_API_KEY")
    refused(fetcher(None), "s3://bucket/x.png", "bad_url", "task id")
    refused(fetcher(None), "s3://bucket/x.png", "bad_url", "not a number", task_id="7; DROP")  # type: ignore[arg-type]


# --- credentials and redirects ----------------------------------------------------------------------------------


def test_cloud_storage_resolves_through_label_studio_without_leaking_credentials(ls: Server, ext: Server) -> None:
    fileuris: list[str] = []

    def resolve(h: BaseHTTPRequestHandler) -> None:
        fileuris.append(base64.urlsafe_b64decode(parse_qs(urlsplit(h.path).query)["fileuri"][0]).decode())
        # Like Label Studio: 303 to a presigned URL on another host; a cookie to check it is not forwarded.
        reply(h, 303, Location=f"{ext.url}/bucket/dir/x.png?X-Amz-Signature=secret", Set_Cookie="sessionid=abc")

    ls.routes["/tasks/7/resolve/"] = resolve
    ext.routes["/bucket/dir/x.png"] = lambda h: reply(h, 200, IMAGE)
    got = fetcher(ls, policy=public).fetch("s3://bucket/dir/x.png", 7)
    assert got.data == IMAGE and got.source == "s3://bucket/dir/x.png" and fileuris == ["s3://bucket/dir/x.png"]
    assert ls.requests()[0][1]["Authorization"] == f"Token {LEGACY}"
    (_, headers), = ext.requests()
    assert "Authorization" not in headers and "Cookie" not in headers


def test_credentials_go_only_to_the_label_studio_origin(ls: Server, ext: Server) -> None:
    ext.routes["/x.png"] = lambda h: reply(h, 200, IMAGE)
    # Same IP as Label Studio, other port: another origin, so no token (cookies would not be port-scoped either).
    assert fetcher(ls, policy=public).fetch(f"{ext.url}/x.png").data == IMAGE
    assert "Authorization" not in ext.requests()[0][1]
    # Also not when a Label Studio path redirects there.
    ls.routes["/data/upload/1/x.png"] = lambda h: reply(h, 302, Location=f"{ext.url}/x.png")
    fetcher(ls, policy=public).fetch("/data/upload/1/x.png")
    assert all("Authorization" not in headers for _, headers in ext.requests())
    # Nor when an outside URL redirects into Label Studio: its files are not the outside URL's to reach.
    ext.routes["/to-ls"] = lambda h: reply(h, 302, Location=f"{ls.url}/data/upload/1/secret.png")
    ls.routes["/data/upload/1/secret.png"] = authed(f"Token {LEGACY}")
    refused(fetcher(ls, policy=public), f"{ext.url}/to-ls", "http", "answered 401")
    assert "Authorization" not in ls.requests()[-1][1]


def test_redirects_to_private_addresses_or_other_schemes_are_refused(ext: Server) -> None:
    targets = {"/a": "http://10.0.0.5/secret", "/b": "http://169.254.169.254/latest/meta-data/",
               "/c": "file:///etc/passwd", "/d": "http://[::1]:6379/", "/loop": "/loop"}
    for path, target in targets.items():
        ext.routes[path] = lambda h, t=target: reply(h, 302, Location=t)
    f = fetcher(None, policy=only_loopback_public)
    refused(f, f"{ext.url}/a", "refused", "10.0.0.5", "private network", "redirected from")
    refused(f, f"{ext.url}/b", "refused", "169.254.169.254", "link-local")
    refused(f, f"{ext.url}/c", "refused", "file")
    refused(f, f"{ext.url}/d", "refused", "::1", "loopback")
    refused(f, f"{ext.url}/loop", "http", "more than 5 times")


# --- address policy ---------------------------------------------------------------------------------------------


def test_default_policy_refuses_loopback_other_than_label_studio(ls: Server, ext: Server) -> None:
    ext.routes["/x.png"] = lambda h: reply(h, 200, IMAGE)
    f = fetcher(ls)
    refused(f, f"{ext.url}/x.png", "refused", "127.0.0.1", "loopback", "refuses")
    refused(f, f"http://localhost:{ext.port}/x.png", "refused", "localhost (127.0.0.1)", "loopback")
    assert ext.log == []  # refused before connecting


@pytest.mark.parametrize("host", [
    "10.0.0.5", "172.16.0.1", "192.168.1.1", "169.254.169.254", "127.0.0.2", "0.0.0.0", "224.0.0.1", "100.64.0.1",
    "240.0.0.1", "2130706433", "[::1]", "[::]", "[fe80::1]", "[fd00::1]", "[ff02::1]", "[::ffff:10.0.0.5]",
    "[64:ff9b::a00:5]", "[2002:a00:5::]",
])
def test_non_public_addresses_are_refused_before_connecting(host: str) -> None:
    refused(fetcher(None), f"http://{host}/x.png", "refused", "which the backend refuses to fetch")


def test_address_policy_lets_public_addresses_through() -> None:
    for ip in ("8.8.8.8", "2001:4860:4860::8888", "::ffff:8.8.8.8"):
        assert address_problem(ipaddress.ip_address(ip)) is None


def test_connection_is_pinned_to_the_checked_address(ext: Server) -> None:
    ext.routes["/x.png"] = lambda h: reply(h, 200, IMAGE)
    seen: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        seen.append(host)
        return {"cdn.example.test": ["127.0.0.1"], "mixed.example.test": ["127.0.0.1", "10.0.0.5"]}[host]

    f = fetcher(None, resolver=resolver, policy=only_loopback_public)
    # .test never resolves in DNS: success means the socket went to the address our resolver returned and we checked.
    assert f.fetch(f"http://cdn.example.test:{ext.port}/x.png").data == IMAGE
    assert ext.requests()[0][1]["Host"] == f"cdn.example.test:{ext.port}"
    refused(f, f"http://mixed.example.test:{ext.port}/x.png", "refused", "mixed.example.test (10.0.0.5)")
    assert seen == ["cdn.example.test", "mixed.example.test"] and len(ext.log) == 1


@pytest.mark.parametrize("value", ["file:///etc/passwd", "ftp://example.com/x.png", "gopher://example.com/",
                                   "javascript:alert(1)", "//example.com/x.png", "images/x.png"])
def test_other_schemes_are_refused(value: str) -> None:
    refused(fetcher(None), value, "bad_url", "only http(s) URLs")


@pytest.mark.parametrize("value", ["http://[::1", "http://exa mple.com/x", "http:///x", "https://", "http://example.com:port/x",
                                   "http://127.0.0.1:99999/x"])
def test_malformed_urls(value: str) -> None:
    refused(fetcher(None), value, "bad_url", "malformed")


@pytest.mark.parametrize("value", [None, "", "   ", 42])
def test_missing_image_value(value: object) -> None:
    refused(fetcher(None), value, "bad_url", "no image URL")


# --- limits -----------------------------------------------------------------------------------------------------


def test_size_limit_from_content_length_and_mid_stream(ext: Server) -> None:
    def announced(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(412_000_000))
        h.end_headers()
        h.wfile.write(b"\0" * 1000)

    def unannounced(h: BaseHTTPRequestHandler) -> None:  # HTTP/1.0, no length: the body ends when we close
        h.send_response(200)
        h.end_headers()
        for _ in range(48):
            h.wfile.write(b"\0" * 65536)

    ext.routes["/big.png"], ext.routes["/stream.png"] = announced, unannounced
    f = fetcher(None, policy=public, max_bytes=1_000_000)
    refused(f, f"{ext.url}/big.png", "too_large", "412 MB, above the 1 MB limit")
    refused(f, f"{ext.url}/stream.png", "too_large", "larger than the 1 MB limit")
    refused(f, "data:image/png;base64," + "A" * 2_000_000, "too_large", "above the 1 MB limit")


def test_slow_server_read_timeout(ext: Server) -> None:
    def slow(h: BaseHTTPRequestHandler) -> None:
        ext.stop.wait(2.0)
        reply(h, 200, IMAGE)

    ext.routes["/slow.png"] = slow
    start = time.monotonic()
    refused(fetcher(None, policy=public, read_timeout_s=0.3), f"{ext.url}/slow.png", "timeout", "timed out after 0.3 s")
    assert time.monotonic() - start < 1.5


@pytest.mark.parametrize("where", ["body", "headers"])
def test_dripping_server_hits_the_overall_deadline(ext: Server, where: str) -> None:
    def drip(h: BaseHTTPRequestHandler) -> None:
        # One byte every 50 ms never trips a 1 s read timeout; only the overall deadline stops it.
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        if where == "body":
            h.wfile.write(b"Content-Length: 100000\r\n\r\n")
        for _ in range(200):
            if ext.stop.wait(0.05):
                return
            h.wfile.write(b"X-Drip: a\r\n" if where == "headers" else b"\0")

    ext.routes["/drip.png"] = drip
    start = time.monotonic()
    refused(fetcher(None, policy=public, read_timeout_s=1.0, deadline_s=0.6), f"{ext.url}/drip.png", "timeout",
            "took longer than 0.6 s")
    assert time.monotonic() - start < 1.5


def test_pixel_limit_is_read_from_the_header_without_decoding(ls: Server) -> None:
    # Neither file has pixel data: decoding would fail with another message, so "MP" proves nothing was decoded.
    ls.routes["/data/upload/1/bomb.png"] = lambda h: reply(h, 200, png_header(20000, 20000))
    ls.routes["/data/upload/1/big.png"] = lambda h: reply(h, 200, png_header(9000, 9000))
    f = fetcher(ls)
    refused(f, "/data/upload/1/bomb.png", "too_large", "400.0 MP", "64 MP limit")
    refused(f, "/data/upload/1/big.png", "too_large", "9000x9000 pixels (81.0 MP)", "64 MP limit")
    refused(fetcher(ls, max_pixels=500), "data:image/png;base64," + base64.b64encode(IMAGE).decode(), "too_large",
            "32x24")


# --- image content ----------------------------------------------------------------------------------------------


def test_data_uri() -> None:
    f = fetcher(None)
    got = f.fetch("data:image/png;base64," + base64.b64encode(IMAGE).decode())
    assert got.data == IMAGE and got.source == "data: URI"
    refused(f, "data:image/png;base64,%%%not-base64", "not_image", "not valid base64")
    refused(f, "data:image/svg+xml,<svg/>", "bad_url", "only base64")


def test_not_an_image_corrupt_or_truncated(ext: Server) -> None:
    cut_jpeg = jpeg(400, 300)
    bodies = {"/page": b"<!doctype html><title>Login</title>", "/noise": b"\x00\x01garbage" * 10,
              "/half.png": png(300, 200, (1, 2, 3))[:-40], "/half.jpg": cut_jpeg[: len(cut_jpeg) // 2],
              "/empty.png": b""}
    for path, body in bodies.items():
        ext.routes[path] = lambda h, b=body: reply(h, 200, b)
    f = fetcher(None, policy=public)
    refused(f, f"{ext.url}/page", "not_image", "HTML")
    refused(f, f"{ext.url}/noise", "not_image", "not an image")
    refused(f, f"{ext.url}/half.png", "not_image", "corrupt or truncated")
    refused(f, f"{ext.url}/half.jpg", "not_image", "corrupt or truncated")
    refused(f, f"{ext.url}/empty.png", "not_image", "empty")
    refused(f, f"{ext.url}/missing.png", "not_found", "image server answered 404")


def test_size_is_reported_after_exif_orientation() -> None:
    assert inspect_image(jpeg(40, 20, orientation=6)) == ("JPEG", 20, 40)
    assert inspect_image(jpeg(40, 20)) == ("JPEG", 40, 20)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_is_pinned_and_still_verifies_the_host_name(tmp_path: Path) -> None:
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", key,
                    "-out", cert, "-subj", "/CN=img.example.test", "-addext", "subjectAltName=DNS:img.example.test"],
                   check=True, capture_output=True)
    server = Server(tls=(cert, key))
    try:
        server.routes["/x.png"] = lambda h: reply(h, 200, IMAGE)
        resolver = {"img.example.test": ["127.0.0.1"]}.get
        url = f"https://img.example.test:{server.port}/x.png"
        got = fetcher(None, resolver=resolver, policy=public, tls_verify=cert).fetch(url)
        assert got.data == IMAGE
        # The certificate is checked against the URL's host name, not the pinned address, and not skipped.
        refused(fetcher(None, policy=public, tls_verify=cert), f"{server.url}/x.png", "unreachable", "TLS failed")
        refused(fetcher(None, resolver=resolver, policy=public), url, "unreachable", "TLS failed",
                "certificate verify failed")
    finally:
        server.close()
