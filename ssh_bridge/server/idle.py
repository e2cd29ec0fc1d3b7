"""When an SSH connection counts as idle: nothing running and nothing typed.

asyncssh has a login timeout and keepalives, but no idle time: a client that logged in and
then sat there (`ssh -N`, a shell at its prompt) would hold its connection for ever. A
command that runs, or waits for an approval, keeps the connection busy however quiet it
is; keys typed at a prompt are activity. The same clock times a login (limits.authenticate),
paused while the gateway checks the token.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator


class Idle:
    """Calls `expire` once the connection has been idle for `seconds`."""

    def __init__(self, seconds: float, expire: Callable[[], None]) -> None:
        self.seconds, self.expire = seconds, expire
        self.running = 0
        self.timer: asyncio.TimerHandle | None = None

    def touch(self) -> None:
        """Something happened: the idle time starts again (once nothing runs)."""
        self.stop()
        if not self.running:
            self.timer = asyncio.get_running_loop().call_later(self.seconds, self.expire)

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """While a command runs or is held, the connection is not idle."""
        self.running += 1
        self.stop()
        try:
            yield
        finally:
            self.running -= 1
            self.touch()

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
