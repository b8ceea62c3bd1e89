"""What every HTTP test double shares: an aiohttp app served on 127.0.0.1 on a free port.

A double subclasses `HttpDouble` and builds its app in `make_app()`; `start()` serves it (on the
port the OS picks when it binds, so doubles never collide), `url` is where it answers, `stop()`
shuts it down (a double with more to end overrides it and calls `super().stop()`), and
`async with Double() as double:` does both.
"""

from __future__ import annotations

from typing import Self

from aiohttp import web

HOST = "127.0.0.1"


class HttpDouble:
    def __init__(self, address: str = HOST) -> None:
        self.address = address
        """The address served on (loopback)."""
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def make_app(self) -> web.Application:
        """The double's routes; called by every `start()`."""
        raise NotImplementedError

    async def start(self) -> Self:
        self._runner = web.AppRunner(self.make_app(), handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.address, 0).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
