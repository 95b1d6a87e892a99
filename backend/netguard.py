"""The network-safety layer under :mod:`backend.images`: where the backend may connect, and for how long.

The backend fetches whatever URL a task's image field holds, and anyone who can create tasks in Label Studio
chooses that URL. Without a guard, the backend would be a way into the network it runs in (server-side request
forgery, SSRF): ``http://127.0.0.1:6379/`` (the embedded Redis), ``http://169.254.169.254/`` (cloud instance
metadata and its credentials), or any service on the cluster or office network, with the response shown back to the
annotator as an error message or fed to the model. This module defends against that:

- **address policy** — :func:`address_problem` refuses loopback, private, link-local, multicast, unspecified,
  reserved and other non-public addresses, judging IPv4 addresses embedded in IPv6 (mapped, 6to4, NAT64) by the
  IPv4 address they reach. The Label Studio host, and hosts the operator allows (``allowed_private_hosts``), are
  exempt: they are often on a private network on purpose.
- **DNS rebinding** — checking a host name and then letting the HTTP library resolve it again to connect leaves a
  window in which a hostile DNS server answers first with a public address, then with ``127.0.0.1``. The guard
  resolves once, checks every address, and opens the socket to exactly the address it checked (TLS still verifies
  the certificate against the host name). Redirects are not followed by the HTTP library: the fetcher follows them
  by hand, so every hop goes through this guard again.
- **slow-loris deadlines** — connect and read timeouts bound each wait, not the whole fetch: a server that sends one
  byte just before every read timeout holds a gunicorn thread for as long as it likes. :class:`_Deadline` shuts down
  every socket of a fetch from a timer when its overall deadline passes, which wakes any blocked read.

Refusals raise :class:`GuardError`, whose ``message`` and ``code`` the fetcher passes on as its own error.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from http.cookiejar import DefaultCookiePolicy
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util.connection import create_connection

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]
AddressPolicy = Callable[[IPAddress], "str | None"]


class GuardError(Exception):
    """A connection the guard refused (``code`` ``refused``) or could not resolve (``unreachable``).

    ``message`` is written for the Label Studio user; the codes are those of :class:`backend.images.ImageFetchError`.
    """

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def system_resolver(host: str, port: int) -> list[str]:
    """All addresses ``host`` resolves to (the default resolver)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def address_problem(ip: IPAddress) -> str | None:
    """Why the backend refuses to connect to ``ip`` (e.g. ``"a loopback address"``), or None for a public one."""
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv4 embedded in IPv6 (mapped, 6to4, NAT64) reaches the IPv4 address, so judge that one.
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in ipaddress.IPv6Network("64:ff9b::/96"):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return address_problem(embedded)
    for kind in ("loopback", "link-local", "multicast", "unspecified", "private network", "reserved"):
        if getattr(ip, "is_" + kind.split()[0].replace("-", "_")):
            return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} address"
    return None if ip.is_global else "a non-public address"


class _Deadline:
    """Shuts this fetch's sockets down when the overall deadline passes.

    Per-read timeouts cannot stop a server that drips one byte at a time; shutting the socket down from a timer
    wakes any blocked read, so no thread is held longer than the deadline.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(seconds, 0.0), self.add)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def add(self, sock: socket.socket | None = None) -> None:
        """Register a socket of this fetch; with no socket, the timer's call: shut them all down."""
        with self._lock:
            self._sockets += [sock] if sock else []
            self.expired = self.expired or sock is None
            for s in self._sockets if self.expired else ():
                with contextlib.suppress(OSError):  # already closed
                    s.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


_current = threading.local()  # the running fetch's _Deadline, for the connections it opens (same thread)


class _Guard:
    """Decides where a connection may go, and opens it to exactly the address it checked.

    Args:
        label_studio_url: the Label Studio URL (or ""); its host and port are trusted.
        allowed_private_hosts: host names (or host:port) also allowed to resolve to non-public addresses.
    """

    def __init__(self, label_studio_url: str, allowed_private_hosts: Iterable[str], resolver: Resolver,
                 policy: AddressPolicy) -> None:
        origin = _origin(label_studio_url) if label_studio_url else None
        self.ls_hostport = origin[1:] if origin else None
        self.allowed = {h.lower() for h in allowed_private_hosts}
        self.resolver = resolver
        self.policy = policy
        self.adapter_class = _guarded_adapter_class(self)

    def is_ls_host(self, url: str) -> bool:
        origin = _origin(url)
        return origin is not None and origin[1:] == self.ls_hostport

    def addresses(self, host: str, port: int) -> list[str]:
        host = host.lower().rstrip(".")
        trusted = (host, port) == self.ls_hostport or host in self.allowed or f"{host}:{port}" in self.allowed
        try:
            ips = self.resolver(host, port)
        except OSError as e:
            raise GuardError(f"cannot resolve the host name {host!r} ({e})", "unreachable") from e
        if not ips:
            raise GuardError(f"the host name {host!r} has no address", "unreachable")
        for ip in ips:
            try:
                address = ipaddress.ip_address(ip.split("%")[0])
            except ValueError as e:
                raise GuardError(f"{host!r} resolved to an invalid address {ip!r}", "refused") from e
            problem = None if trusted else self.policy(address)
            if problem:
                shown = host if host == str(address) else f"{host} ({address})"
                raise GuardError(f"the image URL points to {shown}, {problem}, which the backend refuses to "
                                 "fetch from", "refused")
        return ips

    def connect(self, conn: HTTPConnection) -> socket.socket:
        """Replaces urllib3's ``_new_conn``: resolve, check, then connect to the checked address only."""
        last: OSError | None = None
        for ip in self.addresses(conn.host, int(conn.port or 0)):
            try:
                sock = create_connection((ip, conn.port), conn.timeout, source_address=conn.source_address,
                                         socket_options=conn.socket_options)
            except TimeoutError as e:
                raise ConnectTimeoutError(conn, f"connect timeout ({conn.timeout} s)") from e
            except OSError as e:
                last = e
                continue
            deadline = getattr(_current, "deadline", None)
            if deadline is not None:
                deadline.add(sock)
            return sock
        raise NewConnectionError(conn, f"Failed to establish a new connection: {last}") from last


def _guarded_adapter_class(guard: _Guard) -> type[HTTPAdapter]:
    """A requests adapter class whose connections go through ``guard``.

    One adapter per fetch: its pool is not shared, so every socket a fetch uses was opened (and registered with
    its deadline) by that fetch.
    """

    class Conn(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            return guard.connect(self)

    class TLSConn(HTTPSConnection):  # TLS still verifies the certificate against the host name
        def _new_conn(self) -> socket.socket:
            return guard.connect(self)

    class Pool(HTTPConnectionPool):
        ConnectionCls = Conn

    class TLSPool(HTTPSConnectionPool):
        ConnectionCls = TLSConn

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": TLSPool}

    return Adapter


@contextlib.contextmanager
def _guarded_session(guard: _Guard, deadline_s: float,
                     tls_verify: bool | str) -> Iterator[tuple[requests.Session, _Deadline]]:
    """A session for one fetch, every connection through ``guard``, and the fetch's deadline (``deadline_s``)."""
    deadline = _Deadline(deadline_s)
    _current.deadline = deadline
    session = requests.Session()
    session.verify = tls_verify
    session.trust_env = False  # no proxies (they would bypass the address checks) and no ~/.netrc credentials
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))  # cookies are not port-scoped
    adapter = guard.adapter_class()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    try:
        yield session, deadline
    finally:
        session.close()
        deadline.cancel()
        _current.deadline = None


def _origin(url: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of ``url``, the default port filled in; None when the port is invalid."""
    split = urlsplit(url)
    try:
        port = split.port or (443 if split.scheme.lower() == "https" else 80)
    except ValueError:
        return None
    return split.scheme.lower(), (split.hostname or "").rstrip("."), port


def _reason(e: BaseException | None) -> str:
    """The innermost OS error's text ("Connection refused") rather than urllib3's nested repr."""
    seen: set[int] = set()
    stack: list[BaseException] = [e] if e is not None else []
    while stack:
        err = stack.pop(0)
        if id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, OSError) and err.strerror:
            return err.strerror
        stack += [a for a in err.args if isinstance(a, BaseException)]
        stack += [x for x in (err.__cause__, err.__context__, getattr(err, "reason", None)) if x is not None]
    return str(e)[:200] if e is not None else "unknown error"
