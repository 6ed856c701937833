"""Transport tweaks of the uvicorn server: one write per response (`CoalescingTransport`), through
uvicorn's own HTTP protocol (`http_protocol`)."""
from __future__ import annotations

import asyncio


class CoalescingTransport:
    """A transport that holds what is written until the end of the current event-loop step and sends it
    with one write. uvicorn writes a response's status line and headers, then its body, as two writes:
    two system calls and two TCP segments for the client to read. Ordering is kept; closing, EOF and a
    protocol switch flush first; nothing waits past the step that wrote it."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport, self._loop, self._held = transport, loop, []

    def write(self, data) -> None:
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(data)

    def writelines(self, lines) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        held = self._held
        if held:
            self._held = []
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._held))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def set_protocol(self, protocol) -> None:
        self.flush()
        self._transport.set_protocol(protocol)

    def abort(self) -> None:
        self._held = []
        self._transport.abort()

    def __getattr__(self, name):  # is_closing, get_extra_info, pause_reading, ...
        return getattr(self._transport, name)


def http_protocol():
    """uvicorn's HTTP protocol (httptools when installed, else h11) writing through CoalescingTransport."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class EdgeHTTP(base):
        def connection_made(self, transport):
            super().connection_made(CoalescingTransport(transport, self.loop))

    return EdgeHTTP
