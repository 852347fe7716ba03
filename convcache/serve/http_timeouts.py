"""A header-read timeout and header size caps for uvicorn's HTTP protocol.

uvicorn times out idle keep-alive connections, but not a client that opens a connection and sends
its request headers slowly or never finishes them (a slowloris): thousands of those exhaust file
descriptors. `HeaderTimeoutProtocol` extends uvicorn's own protocol class (httptools when installed,
else h11): a connection with no request in progress is closed when a request's headers have not
completed within `CONVCACHE_HEADER_TIMEOUT_S` seconds (default 10) of the connection opening or of
the previous response ending. Pass it to uvicorn as `http="convcache.serve.http_timeouts:HeaderTimeoutProtocol"`
(a module-level class, so that `--workers N` can import it in each worker).

Header caps: httptools, unlike h11 (16 KiB by default), bounds neither the size nor the number of request
headers. A request line plus headers over `CONVCACHE_MAX_HEADER_BYTES` (32 KiB) or with more than
`CONVCACHE_MAX_HEADER_FIELDS` (100) lines is answered 431 and the connection closed, before the app runs.
"""

from __future__ import annotations

import json
import os

ENV = "CONVCACHE_HEADER_TIMEOUT_S"
BYTES_ENV, FIELDS_ENV = "CONVCACHE_MAX_HEADER_BYTES", "CONVCACHE_MAX_HEADER_FIELDS"

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base

    HTTPTOOLS = True
except ImportError:  # httptools is optional in uvicorn; h11 caps headers itself (h11_max_incomplete_event_size)
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Base

    HTTPTOOLS = False


class _HeadersTooLarge(Exception):
    pass


class HeaderTimeoutProtocol(_Base):
    def connection_made(self, transport):
        super().connection_made(transport)
        self._header_timeout_s = float(os.environ.get(ENV, "10"))
        self._max_header_bytes = int(os.environ.get(BYTES_ENV, str(32 << 10)))
        self._max_header_fields = int(os.environ.get(FIELDS_ENV, "100"))
        self._header_bytes = self._header_fields = 0
        self._too_large = None
        self._header_timer = self.loop.call_later(self._header_timeout_s, self._header_timeout)

    # --- httptools: count the request line and headers as they are parsed (h11 does this itself)

    def on_message_begin(self):
        super().on_message_begin()
        self._header_bytes = self._header_fields = 0

    def on_url(self, url):
        self._count(len(url), 0)
        super().on_url(url)

    def on_header(self, name, value):
        self._count(len(name) + len(value) + 4, 1)
        super().on_header(name, value)

    def _count(self, n: int, fields: int) -> None:
        self._header_bytes += n
        self._header_fields += fields
        if self._header_bytes > self._max_header_bytes:
            self._too_large = f"request headers over {self._max_header_bytes} bytes"
        elif self._header_fields > self._max_header_fields:
            self._too_large = f"over {self._max_header_fields} request header fields"
        if self._too_large:
            raise _HeadersTooLarge(self._too_large)  # httptools stops parsing; data_received answers

    def send_400_response(self, msg: str) -> None:
        if not self._too_large:
            return super().send_400_response(msg)
        body = json.dumps({"error": self._too_large}).encode()
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                             b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
        self.transport.close()

    def on_response_complete(self):
        super().on_response_complete()
        self._header_timer.cancel()
        if not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self._header_timeout_s, self._header_timeout)

    def _header_timeout(self):
        cycle = self.cycle
        if (cycle is None or cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()  # no complete request headers within the timeout

    def connection_lost(self, exc):
        self._header_timer.cancel()
        super().connection_lost(exc)
