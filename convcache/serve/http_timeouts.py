"""A header-read timeout for uvicorn's HTTP protocol.

uvicorn times out idle keep-alive connections, but not a client that opens a connection and sends
its request headers slowly or never finishes them (a slowloris): thousands of those exhaust file
descriptors. `HeaderTimeoutProtocol` extends uvicorn's own protocol class (httptools when installed,
else h11): a connection with no request in progress is closed when a request's headers have not
completed within `CONVCACHE_HEADER_TIMEOUT_S` seconds (default 10) of the connection opening or of
the previous response ending. Pass it to uvicorn as `http="convcache.serve.http_timeouts:HeaderTimeoutProtocol"`
(a module-level class, so that `--workers N` can import it in each worker).
"""

from __future__ import annotations

import os

ENV = "CONVCACHE_HEADER_TIMEOUT_S"

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base
except ImportError:  # httptools is optional in uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Base


class HeaderTimeoutProtocol(_Base):
    def connection_made(self, transport):
        super().connection_made(transport)
        self._header_timeout_s = float(os.environ.get(ENV, "10"))
        self._header_timer = self.loop.call_later(self._header_timeout_s, self._header_timeout)

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
