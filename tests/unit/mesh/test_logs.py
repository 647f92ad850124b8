"""mesh.logs: the proxies' log lines, written once per loop turn, none lost or reordered."""

from __future__ import annotations

import asyncio
import io
import logging

import uvloop

from mesh.logs import TurnBufferedHandler


class Recording(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def _logger(stream: Recording) -> tuple[logging.Logger, TurnBufferedHandler]:
    handler = TurnBufferedHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger(f"test.logs.{id(stream)}")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    return log, handler


def test_a_turns_lines_are_written_together_in_order_before_the_next_turn() -> None:
    stream = Recording()
    log, _ = _logger(stream)

    async def body() -> None:
        for n in range(3):
            log.info("connection %d", n)
        assert stream.writes == []  # still this turn
        await asyncio.sleep(0)
        assert stream.writes == ["INFO connection 0\nINFO connection 1\nINFO connection 2\n"]
        log.warning("another turn")
        await asyncio.sleep(0)
        assert stream.writes[-1] == "WARNING another turn\n"

    uvloop.run(body())


def test_a_line_outside_the_loop_is_written_at_once_and_shutdown_loses_nothing() -> None:
    stream = Recording()
    log, handler = _logger(stream)
    log.info("before the loop")
    assert stream.getvalue() == "INFO before the loop\n"

    async def body() -> None:
        log.info("the loop's last line")  # no turn after it

    uvloop.run(body())
    handler.flush()  # what logging.shutdown does at exit
    assert stream.getvalue().endswith("INFO the loop's last line\n")
