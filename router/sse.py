"""Server-sent events over aiohttp: one `data: {json}` event per message.

The response is opened lazily, on the first event, so that a handler can still answer
with a plain JSON error (and its status code) when a request fails before its first token.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import web

_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    # Reverse proxies (nginx) buffer responses unless told not to; tokens must flow.
    "X-Accel-Buffering": "no",
}


class EventStream:
    """Writes SSE `data:` events to one HTTP response.

    `send` raises ConnectionResetError once the client has gone away; the caller should
    then stop producing (and cancel the work behind the stream).
    """

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._response: web.StreamResponse | None = None

    @property
    def started(self) -> bool:
        """Whether the status line and headers have been sent."""
        return self._response is not None

    async def start(self) -> None:
        """Send the status line and headers now, before any event (idempotent)."""
        if self._response is None:
            response = web.StreamResponse(status=200, headers=_HEADERS)
            await response.prepare(self._request)
            self._response = response

    async def send(self, data: Mapping[str, object]) -> None:
        """Write one event whose data is `data` as compact JSON (UTF-8, one line; a NaN or
        infinite float is written as null). orjson: this runs once per token per stream."""
        await self._write(b"data: " + orjson.dumps(data) + b"\n\n")

    async def send_text(self, data: str) -> None:
        """Write one event whose data is `data` as is (one line: OpenAI's closing `[DONE]`)."""
        await self._write(f"data: {data}\n\n".encode())

    async def _write(self, event: bytes) -> None:
        await self.start()
        assert self._response is not None
        await self._response.write(event)

    async def finish(self) -> web.StreamResponse:
        """End the stream and return the response for the handler to return."""
        if self._response is None:
            raise RuntimeError("finish() before any event was sent: answer with a JSON body")
        await self._response.write_eof()
        return self._response
