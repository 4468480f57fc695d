"""A real HTTP proxy on 127.0.0.1 in front of the session's S3 server, that can misbehave on purpose.

Requests are forwarded with their own Host header (SigV4 signs it, so the server checks the signature
the client made for the proxy's address). ``fail(n, status, code)`` answers the next ``n`` requests with
an S3 error instead (503 SlowDown, 500 InternalError, 403 AccessDenied), ``reset(n)`` closes the
connection of the next ``n`` without an answer (``path``: only requests whose path holds it), and
``down()``/``up()`` close and reopen the listening port (connection refused meanwhile). ``requests``
counts every request that reached the proxy.
"""

from __future__ import annotations

import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the AWS SDK expects

    def log_message(self, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.proxy.connections.add(self.connection)

    def finish(self) -> None:
        self.server.proxy.connections.discard(self.connection)
        super().finish()

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return body
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _any(self) -> None:
        proxy: S3Proxy = self.server.proxy
        body = self._body()
        fault = proxy.next_fault(self.path)
        if fault == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.close_connection = True
            self.connection.close()  # SO_LINGER 0: the client sees a connection reset
            return
        if fault is not None:
            status, code = fault
            xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                   f"<Message>{code} (from the test proxy)</Message></Error>").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(xml)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(xml)
            return
        conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
            if body or self.headers.get("Transfer-Encoding"):
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        # a HEAD answer has no body but the object's length
        self.send_header("Content-Length", response.getheader("Content-Length", "0") if self.command == "HEAD"
                         else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any


class S3Proxy:
    """The proxy; ``endpoint`` is its URL. Stop it with ``close()``."""

    def __init__(self, upstream: str):
        parsed = urlparse(upstream)
        self.upstream_host, self.upstream_port = parsed.hostname, parsed.port
        self.requests = 0
        self._faults: list[list] = []  # [requests left, fault, path substring]
        self.connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def next_fault(self, path: str):
        with self._lock:
            self.requests += 1
            for rule in self._faults:
                if rule[0] > 0 and rule[2] in path:
                    rule[0] -= 1
                    return rule[1]
            return None

    def fail(self, n: int, status: int = 503, code: str = "SlowDown", path: str = "") -> None:
        with self._lock:
            self._faults.append([n, (status, code), path])

    def reset(self, n: int, path: str = "") -> None:
        with self._lock:
            self._faults.append([n, "reset", path])

    def pending(self) -> int:
        """Faults not yet served."""
        with self._lock:
            return sum(rule[0] for rule in self._faults)

    def up(self) -> None:
        """Listen (again, on the same port once it had one)."""
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        server.daemon_threads = True
        server.proxy = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def down(self) -> None:
        """Stop listening and cut the open connections: new ones are refused until ``up()``."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        for conn in list(self.connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.down()
