"""Where tests contain what a third party leaks: the sockets pymongo leaves unclosed on a cancelled connect."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import warnings
from collections.abc import AsyncIterator


@contextlib.asynccontextmanager
async def collecting_the_sockets_pymongo_leaks() -> AsyncIterator[None]:
    """Collect, here and silently, the sockets pymongo leaks when a connection it is making is cancelled.

    pymongo 4.20 closes a half-made socket on OSError but not on the cancellation that `close()` sends to a
    monitor dialling a dead server, or that a cancelled call brings (PYTHON-5867); the socket is freed when
    collected, which `filterwarnings = error` would fail on in whichever test the collector runs. Only that
    warning is silenced, only in this block, and the block ends by collecting, so none is left for later: what
    holds a leaked socket (a cancelled task, an exception from the closed client) must be let go inside it.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"unclosed <socket\.socket", category=ResourceWarning)
        try:
            yield
        finally:
            # `close()` cancels the client's monitor tasks without waiting for them: they leak once they run.
            current = asyncio.current_task()
            cancelled = [task for task in asyncio.all_tasks() if task is not current and task.cancelling()]
            if cancelled:
                await asyncio.wait(cancelled, timeout=5)
            gc.collect()
