"""Reaching another service in bounded time: a Ray cluster, an object store's endpoint, the model hub.

Their clients wait long for an endpoint that accepts a connection and never answers (Ray's GCS client
retried 127.0.0.1:9 for 14 minutes; pyarrow's S3 and GCS clients 100-360 s against a silent endpoint). So
before a client is pointed at an endpoint, this module asks the endpoint itself for a first byte, within
GDD_RAY_TIMEOUT_S seconds (default 30; raise it for a slow link): a closed port or an unknown host fails at
once, a silent one after the timeout, each in one line (`Unreachable`, a UserError: exit 2). The clients are
then given the same limit (connect and request timeouts, few retries) for what follows.

    HTTP(S) endpoints (S3-compatible stores, the GCS emulator, the hub): any HTTP answer, even 403, is one.
    Ray (a GCS at host:port, or Ray Client at ray://host:port): both speak gRPC, so the probe opens an
    HTTP/2 connection (RFC 9113 3.4: the client preface, then SETTINGS) and waits for the server's first
    frame, which a gRPC server sends at once whatever its authentication.

A probe that succeeded is not repeated in this process (one extra round trip per endpoint and process); one
that failed is not repeated for a minute (a command that asks twice fails once).
"""

from __future__ import annotations

import functools
import socket
import time
import urllib.error
import urllib.request

from gdd_ray import schema
from gdd_ray.errors import UserError

TIMEOUT_ENV = "GDD_RAY_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 3600.0
# The HTTP/2 client connection preface and an empty SETTINGS frame (length 0, type 4, flags 0, stream 0).
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


class Unreachable(UserError):
    """A service that cannot be used at all: unknown scheme, no credentials, endpoint closed, silent or unknown."""


def timeout_s() -> float:
    """Seconds any one wait for another service may take (GDD_RAY_TIMEOUT_S, default 30)."""
    return schema.env_number(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, 1.0, MAX_TIMEOUT_S)


def _silent(what: str, where: str, limit: float) -> Unreachable:
    return Unreachable(
        f"{what}: {where} accepted a connection but did not answer within {limit:g} s; check the address "
        f"(a slow link: raise {TIMEOUT_ENV}, now {limit:g})"
    )


def _failed(what: str, where: str, e: BaseException) -> Unreachable:
    why = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(why, OSError) and why.strerror:
        why = why.strerror
    return Unreachable(f"{what}: cannot reach {where} ({why})")


# endpoint -> (when it was probed, the failure or None): a success holds for the process, a failure for a
# minute (one command asks the hub, or a store, several times; each would wait the whole timeout again).
_probed: dict[tuple, tuple[float, Unreachable | None]] = {}
FAILURE_HELD_S = 60.0


def _remembered(probe):
    @functools.wraps(probe)
    def checked(*key) -> None:
        seen = _probed.get(key)
        if seen is not None and (seen[1] is None or time.monotonic() - seen[0] < FAILURE_HELD_S):
            if seen[1] is not None:
                raise seen[1]
            return
        try:
            probe(*key)
        except Unreachable as e:
            _probed[key] = (time.monotonic(), e)
            raise
        _probed[key] = (time.monotonic(), None)

    return checked


@_remembered
def check_http(url: str, what: str) -> None:
    """Raise Unreachable unless the HTTP(S) endpoint `url` answers (any status) within the timeout."""
    limit = timeout_s()
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=limit):
            return
    except urllib.error.HTTPError:  # an answer: the service is there (credentials are its own business)
        return
    except TimeoutError as e:
        raise _silent(what, url, limit) from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise _silent(what, url, limit) from e
        raise _failed(what, url, e) from e
    except (OSError, ValueError) as e:  # a reset, a malformed answer: not a usable endpoint
        raise _failed(what, url, e) from e


@_remembered
def check_grpc(host: str, port: int, what: str) -> None:
    """Raise Unreachable unless a gRPC (HTTP/2) server at host:port sends its first frame within the timeout."""
    limit = timeout_s()
    where = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=limit) as conn:
            conn.settimeout(limit)
            conn.sendall(HTTP2_PREFACE)
            conn.recv(1)  # any byte (a TLS server's alert too), or b"" for a close: something answered
    except TimeoutError as e:
        raise _silent(what, where, limit) from e
    except OSError as e:
        raise _failed(what, where, e) from e
