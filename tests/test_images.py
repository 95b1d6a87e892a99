"""backend.images against real HTTP servers on 127.0.0.1 (see tests/image_fixtures.py): Label Studio paths and
tokens, credentials and redirects, image content."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from image_fixtures import (
    IMAGE,
    LEGACY,
    PAT,
    Server,
    authed,
    fetcher,
    jpeg,
    jwt,
    only_loopback_public,
    png,
    public,
    refused,
    reply,
)
from urllib3.exceptions import InsecureRequestWarning

from backend.config import BackendConfig
from backend.images import FetchSettings, ImageFetcher, ImageFetchError, inspect_image
from worker.client.limits import image_shape_error

pytest_plugins = ["image_fixtures"]  # the fixtures ls and ext (loopback servers) and no_dns
pytestmark = pytest.mark.usefixtures("no_dns")  # fail any test that would send a DNS query

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


def test_sides_lisa_refuses_are_refused_with_the_workers_message() -> None:
    for width, height in ((50000, 1), (1, 50000), (6000, 100)):
        with pytest.raises(ImageFetchError) as info:
            inspect_image(png(width, height))
        assert info.value.code == "bad_shape"
        assert str(info.value) == image_shape_error(width, height)  # what the worker would answer, word for word
    assert inspect_image(png(5000, 100)) == ("PNG", 5000, 100)  # 50:1 itself passes, as in LISA
    with pytest.raises(ImageFetchError, match="the image is 100x6000 pixels"):  # judged as shown, EXIF-rotated
        inspect_image(jpeg(6000, 100, orientation=6))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_fetch_settings_from_the_environment_take_effect(tmp_path: Path, ext: Server) -> None:
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", key,
                    "-out", cert, "-subj", "/CN=img.example.test", "-addext", "subjectAltName=DNS:img.example.test"],
                   check=True, capture_output=True)
    server = Server(tls=(cert, key))
    names = {"img.example.test": ["127.0.0.1"], "127.0.0.1": ["127.0.0.1"]}

    def from_env(**env: str) -> ImageFetcher:
        settings = FetchSettings.from_config(BackendConfig.from_env({f"LISA_LS_{k}": v for k, v in env.items()}))
        return ImageFetcher(settings, resolver=lambda host, port: names[host])  # the default address policy

    try:
        server.routes["/x.png"] = lambda h: reply(h, 200, IMAGE)
        url = f"https://img.example.test:{server.port}/x.png"
        refused(from_env(TLS_VERIFY=cert), url, "refused", "loopback")
        allowed = f"img.example.test:{server.port}"
        assert from_env(TLS_VERIFY=cert, ALLOWED_PRIVATE_HOSTS=allowed).fetch(url).data == IMAGE
        refused(from_env(ALLOWED_PRIVATE_HOSTS=allowed), url, "unreachable", "certificate verify failed")
        with pytest.warns(InsecureRequestWarning):  # verification off, as asked (testing only)
            assert from_env(TLS_VERIFY="0", ALLOWED_PRIVATE_HOSTS=allowed).fetch(url).data == IMAGE
        refused(from_env(TLS_VERIFY=cert, ALLOWED_PRIVATE_HOSTS=allowed, FETCH_MAX_PIXELS="100"), url, "too_large",
                "above the 0.0001 MP limit")
        refused(from_env(TLS_VERIFY=cert, ALLOWED_PRIVATE_HOSTS=allowed, FETCH_MAX_BYTES="50"), url, "too_large",
                "limit")
        ext.routes["/hang.png"] = lambda h: time.sleep(3)
        refused(from_env(ALLOWED_PRIVATE_HOSTS=f"127.0.0.1:{ext.port}", FETCH_DEADLINE_S="0.5"),
                f"{ext.url}/hang.png", "timeout")  # else: "unreachable" once the server hangs up, 3 s later
    finally:
        server.close()
