"""The network guard of backend.images (backend/netguard.py) against real HTTP servers on 127.0.0.1: which addresses
may be reached, connection pinning, and the byte, time and pixel limits (see tests/image_fixtures.py)."""

from __future__ import annotations

import base64
import ipaddress
import time
from http.server import BaseHTTPRequestHandler

import pytest
from image_fixtures import IMAGE, Server, fetcher, only_loopback_public, png_header, public, refused, reply

from backend.images import address_problem

pytest_plugins = ["image_fixtures"]  # the fixtures ls and ext (loopback servers) and no_dns
pytestmark = pytest.mark.usefixtures("no_dns")  # fail any test that would send a DNS query

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
