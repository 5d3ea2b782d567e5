"""A local S3 server (moto) whose own request log counts what a client asks of it.

moto's server runs on werkzeug, which logs one line per request (``"GET /bucket/key HTTP/1.1"
206 -``) to the ``werkzeug`` logger. :class:`RequestLog` collects those lines while it is active,
so a benchmark or a test counts the requests a real s3fs client made (method, path, status),
without wrapping or mocking either side. Everything stays on 127.0.0.1; credentials are dummies.
"""

from __future__ import annotations

import logging
import re
import socket
from dataclasses import dataclass
from typing import Any

from kdcache.core.errors import KdcacheError

REQUEST_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3})')
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ObjectStoreUnavailable(KdcacheError, RuntimeError):
    """moto's server or s3fs is not installed (``pip install 'kdcache[test]'``)."""


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    """The URL path with its query: ``/bucket/key?...``."""
    status: int

    @property
    def key(self) -> str:
        """The object key (the path without bucket and query); "" for a bucket request."""
        parts = self.path.split("?", 1)[0].split("/", 2)
        return parts[2] if len(parts) > 2 else ""

    @property
    def kind(self) -> str:
        """``LIST`` (a listing of the bucket), else the HTTP method."""
        return "LIST" if self.method == "GET" and not self.key else self.method


class RequestLog(logging.Handler):
    """The requests the server logged while this handler was attached (``with log: ...``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.requests: list[Request] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = REQUEST_LINE.search(ANSI.sub("", record.getMessage()))
        if match:
            self.requests.append(Request(match["method"], match["path"], int(match["status"])))

    def __enter__(self) -> RequestLog:
        self.requests.clear()
        logging.getLogger("werkzeug").addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger("werkzeug").removeHandler(self)

    def reads_of(self, suffix: str) -> list[Request]:
        """GET requests of objects whose key ends with ``suffix`` (their bytes were sent)."""
        return [r for r in self.requests if r.method == "GET" and r.key.endswith(suffix)]


class LocalS3:
    """A moto S3 server on a free loopback port (``with LocalS3() as s3: ...``)."""

    def __init__(self) -> None:
        try:
            import s3fs  # noqa: F401
            from moto.server import ThreadedMotoServer
        except ImportError as exc:
            raise ObjectStoreUnavailable(
                f"a local S3 server needs moto[server] and s3fs ({exc}); "
                "pip install 'kdcache[test]'"
            ) from None
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
        self.endpoint = ""
        self._quiet = logging.NullHandler()
        self._saved = (logging.NOTSET, True)

    @property
    def options(self) -> dict[str, Any]:
        """fsspec storage options reaching this server (no AWS environment needed)."""
        return {
            "endpoint_url": self.endpoint,
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"region_name": "eu-west-1"},
        }

    def filesystem(self):
        """A fresh s3fs filesystem (no listing cached from earlier calls)."""
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        return s3fs.S3FileSystem(**self.options)

    def __enter__(self) -> LocalS3:
        # The server's request lines go to RequestLog handlers only: not printed (propagation
        # off), and a handler present keeps werkzeug from adding its own stderr handler.
        logger = logging.getLogger("werkzeug")
        self._saved = (logger.level, logger.propagate)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger.addHandler(self._quiet)
        self._server.start()
        self.endpoint = f"http://127.0.0.1:{self._server._server.server_port}"
        return self

    def __exit__(self, *exc: Any) -> None:
        import s3fs

        self._server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
        logger = logging.getLogger("werkzeug")
        logger.removeHandler(self._quiet)
        logger.setLevel(self._saved[0])
        logger.propagate = self._saved[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
