"""Run torch set-up work in a short-lived thread of its own.

torch's CPU ops use one OpenMP thread team per calling thread, and a team lives as long as
its thread. Once a second long-lived thread (say the main thread, after building a model)
owns a team, libgomp sees more threads than cores and stops spinning between parallel
regions, so the GPU worker thread's small CPU ops get several times slower (measured:
2.5x fewer images/s on the tiny model with 2 cores). Set-up code that may run on the main
thread therefore does its torch work in a thread that ends with it, taking its team along.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["run_in_fresh_thread"]

T = TypeVar("T")


def run_in_fresh_thread(fn: Callable[[], T], name: str = "torch-setup") -> T:
    """Call ``fn`` in a new thread, wait for it, and return its result or raise its
    exception (with its traceback)."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller
            error.append(exc)

    thread = threading.Thread(target=body, name=name)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
