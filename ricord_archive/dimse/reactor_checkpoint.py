"""A fix for a race in pynetdicom's requestor (3.0.4), for the archive's own SCU associations
(C-MOVE sub-operations, PACS imports) and the tests' pynetdicom clients.

pynetdicom's reactor thread pauses while a `send_c_*()` call waits for its responses: the
sender clears `_reactor_checkpoint`, spins until `_is_paused`, sends, and takes the response
off the message queue. But the reactor sets `_is_paused = True` before *every* wait on the
checkpoint, also when the checkpoint is set and it goes straight on to take a message off the
queue. A sender that clears the checkpoint at that moment sees `_is_paused`, sends, and the
reactor takes the response ("Received unexpected C-STORE service message"): the sender waits
for it until its DIMSE timeout (forever without one). It happens only when the peer answers
within about a millisecond, which the archive's asyncio DIMSE server does.

Worse, a reactor woken by `set()` still shows `_is_paused` until it runs again, so the next
`send_c_*()` right after the previous one sees it too.
`install()` gives every pynetdicom Association a checkpoint whose `wait()` lets the reactor
go on only when, under the lock `clear()` takes, the checkpoint is set (and `_is_paused` is
then cleared at once): a sender that sees `_is_paused` after its `clear()` always has a reactor
that blocks before it takes a message.
"""

from __future__ import annotations

import threading
from typing import Any

from pynetdicom.association import Association


class ReactorCheckpoint(threading.Event):
    """`Association._reactor_checkpoint` without the race described above."""

    def __init__(self, association: Association) -> None:
        super().__init__()
        self._association = association
        self._guard = threading.Lock()
        self.set()

    def clear(self) -> None:
        with self._guard:
            super().clear()

    def wait(self, timeout: float | None = None) -> bool:
        """Go on (not paused) only when the checkpoint is set, decided under the lock that
        `clear()` takes; woken up, decide again (a sender may have cleared it meanwhile)."""
        while True:
            with self._guard:
                if self.is_set():
                    self._association._is_paused = False
                    return True
                self._association._is_paused = True
            if not super().wait(timeout):
                return False


_original_init = Association.__init__


def _init(self: Association, *args: Any, **kwargs: Any) -> None:
    _original_init(self, *args, **kwargs)
    self._reactor_checkpoint = ReactorCheckpoint(self)


def install() -> None:
    """Give every Association created from now on a ReactorCheckpoint (idempotent)."""
    Association.__init__ = _init  # type: ignore[method-assign]
