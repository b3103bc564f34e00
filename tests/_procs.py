"""Helpers for the multi-process tests (torchrun, mp.spawn): a local port and a clean worker exit."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (multi-process tests bind nothing else)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leave_worker() -> None:
    """End a spawned worker once its results are written, without C++ static destructors.

    At interpreter exit a gloo worker thread can still be joinable under load and abort the process
    ('terminate called without an active exception') after every result is written. Errors raised
    before this call still propagate and fail the test.
    """
    os._exit(0)
