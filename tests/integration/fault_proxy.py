"""A fault-injecting HTTP proxy on 127.0.0.1 in front of a moto S3 server, for storage-failure tests.

Modes:
- `transient`: for each key in `faults` (key -> kind), the first `count` requests on that object answer the fault,
  then requests pass. Kinds: `slowdown` (503 SlowDown, S3's throttling), `unavailable` (503 ServiceUnavailable),
  `reset` (the connection is reset without an answer).
- `forbidden`: every object request (GET/HEAD on bucket/key) on an object that exists answers 403 AccessDenied (a
  missing key still answers 404, as S3 does when listing is allowed); listings pass.
Every request is forwarded to moto otherwise. `hits` counts the faults answered per key.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ERROR_BODY = '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'


class FaultProxy:
    def __init__(self, upstream: str, mode: str = "transient", faults: dict[str, str] | None = None, count: int = 0):
        self.upstream = urlsplit(upstream)
        self.mode, self.faults, self.count = mode, dict(faults or {}), count
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy.fault_for(self.command, self.path)
                if fault == "reset":
                    # SO_LINGER 0: close() sends RST, which the client sees as a connection reset.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault is not None and fault != "forbidden":
                    status, code = {
                        "slowdown": (503, "SlowDown"),
                        "unavailable": (503, "ServiceUnavailable"),
                        "forbidden": (403, "AccessDenied"),
                    }[fault]
                    payload = ERROR_BODY.format(code=code, message=f"injected {fault}").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload) if self.command != "HEAD" else 0))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                connection = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {key: value for key, value in self.headers.items() if key.lower() not in ("connection", "keep-alive")}
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                if fault == "forbidden" and response.status < 300:
                    payload = ERROR_BODY.format(code="AccessDenied", message="injected forbidden").encode()
                    self.send_response(403)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload) if self.command != "HEAD" else 0))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    connection.close()
                    return
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)) if self.command != "HEAD" else response.getheader("Content-Length", "0"))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                connection.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def fault_for(self, method: str, path: str) -> str | None:
        target = urlsplit(path).path.lstrip("/")
        _, _, key = target.partition("/")
        if not key or method not in ("GET", "HEAD"):
            return None  # bucket-level requests (listings) and writes pass
        if self.mode == "forbidden":
            fault = "forbidden"
        else:
            fault = self.faults.get(key)
            if fault is None:
                return None
            with self.lock:
                if self.hits.get(key, 0) >= self.count:
                    return None
        with self.lock:
            self.hits[key] = self.hits.get(key, 0) + 1
        return fault

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
