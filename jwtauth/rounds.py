"""Rounds: what the callers on an event loop ask for while the loop runs the callbacks that are ready, served
together by one callback that runs after them.

A worker's loop that wakes up finds several requests ready at once (16 connections under `make bench`'s
refresh load: about 5 per round on one worker). Serving their asks together lets each phase of the work run
for all of them in turn (tokens.SigningRounds), or do in one database round trip what would take one each
(PostgresStore.rotate_async). A round is as long as the loop's turn would have been: its requests were ready
at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Ask(Generic[T, R]):
    """What one caller asked for, and the future its answer goes to."""

    item: T
    future: asyncio.Future[R]

    @property
    def is_wanted(self) -> bool:
        """False once its caller was cancelled (its request ended) while it waited: nothing needs doing."""
        return not self.future.cancelled()

    def answer(self, result: R | Exception) -> None:
        """Give the caller `result`, or raise it there if it is an exception; nothing if it was cancelled."""
        if self.future.done():
            return
        if isinstance(result, Exception):
            self.future.set_exception(result)
        else:
            self.future.set_result(result)


class Rounds(Generic[T, R]):
    """Gathers asks in rounds, a round per event loop (tests run several loops, in threads); `serve` is called
    on the loop with each round's asks, in order, and answers each of them, then or later."""

    def __init__(self, serve: Callable[[list[Ask[T, R]]], None]) -> None:
        self._serve = serve
        self._rounds: dict[asyncio.AbstractEventLoop, list[Ask[T, R]]] = {}

    async def ask(self, item: T) -> R:
        """Add `item` to this loop's next round; return its answer."""
        loop = asyncio.get_running_loop()
        waiting = self._rounds.get(loop)
        if waiting is None:
            waiting = self._rounds[loop] = []
            loop.call_soon(self._serve_round, loop)
        future: asyncio.Future[R] = loop.create_future()
        waiting.append(Ask(item, future))
        return await future

    def _serve_round(self, loop: asyncio.AbstractEventLoop) -> None:
        self._serve(self._rounds.pop(loop))
