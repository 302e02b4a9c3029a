"""Transport limits uvicorn does not set by itself: a deadline for a request's headers.

Without it, a client that opens connections and sends its headers a byte at a
time (slowloris) holds them forever. :class:`GuardedH11Protocol` closes a
connection whose request line and headers have not all arrived within
:data:`HEADER_SECONDS` of the connection opening (or of the previous response).
Bodies have their own deadline in the app (``_read_body``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

#: Seconds a client has to send a request's line and headers.
HEADER_SECONDS = 10.0


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the header clock as the connection opens."""
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(HEADER_SECONDS, self._too_slow)

    def _disarm(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()

    def handle_events(self) -> None:
        """Stop the header clock once a request's headers are in."""
        before = self.cycle
        super().handle_events()
        if self.cycle is not None and self.cycle is not before:
            self._disarm()

    def on_response_complete(self) -> None:
        """The next request on a kept-alive connection gets its own header deadline."""
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Any) -> None:
        """Forget the timer with the connection."""
        self._disarm()
        super().connection_lost(exc)
