"""CallGate: many calls at once, or one exclusive piece of work (a new capture, a verifying call).

An optimized model is called from several threads. Capturing it again after the user changed it
swaps the model's memory weights for the adapter's proof, switches modules to eval mode and
re-points parameters into new stacks: calls in flight must not see any of that. The gate lets
calls share it and makes exclusive work wait for the calls in flight, and new calls wait for it.
Written by hand: the standard library has no readers-writer lock.
"""
from __future__ import annotations

import contextlib
import threading


class CallGate:
    """>>> gate = CallGate()
    >>> with gate.shared():
    ...     pass
    >>> with gate.exclusive():
    ...     pass
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._active = 0
        self._writer: int | None = None  # the thread doing exclusive work
        self._depth = 0

    @contextlib.contextmanager
    def shared(self):
        me = threading.get_ident()
        with self._cond:
            if self._writer != me:  # exclusive work may make calls of its own (the proof runs the model)
                while self._writer is not None:
                    self._cond.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        """Exclusive work; must not be entered from inside shared() of the same thread."""
        me = threading.get_ident()
        with self._cond:
            if self._writer != me:
                while self._writer is not None:
                    self._cond.wait()
                self._writer = me
                while self._active:
                    self._cond.wait()
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._writer = None
                self._cond.notify_all()
