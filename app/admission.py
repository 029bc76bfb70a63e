"""Admission control: a bounded number of assessments at once, and a bounded queue.

Every assessment (decode, gates, model call) runs in a worker thread. Without a bound, N
simultaneous uploads mean N decodes and N sets of activations in memory at once. Here at
most ``max_active`` run; up to ``max_queued`` more wait their turn; anything beyond that
is answered 503 with ``Retry-After`` at once, the back-pressure TensorFlow Serving and
Triton give. The body is read *before* a request queues, so a slow upload never holds a
slot (the body-read timeout bounds it instead). When the last running assessment finishes,
freed memory is handed back to the system (``app.memory.trim``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import HTTPException
from starlette.concurrency import run_in_threadpool

from app.memory import trim
from app.metrics import Metrics

QUEUE_FULL = "the server is busy; retry shortly"


class Admission:
    """``async with admission.slot(): ...`` around each assessment."""

    def __init__(
        self, max_active: int, max_queued: int, retry_after_s: int, metrics: Metrics
    ) -> None:
        self.max_active = max_active
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self._slots = asyncio.Semaphore(max_active)
        self.active = 0
        self.waiting = 0

    def _refuse(self) -> HTTPException:
        self.metrics.admission_rejected.inc()
        return HTTPException(
            status_code=503,
            detail=QUEUE_FULL,
            headers={"Retry-After": str(self.retry_after_s)},
        )

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a free slot, or raise 503 + Retry-After when the queue is full."""
        if self.active >= self.max_active and self.waiting >= self.max_queued:
            raise self._refuse()
        self.waiting += 1
        self.metrics.admission_waiting.set(self.waiting)
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
            self.metrics.admission_waiting.set(self.waiting)
        self.active += 1
        self.metrics.admission_active.set(self.active)
        try:
            yield
        finally:
            self.active -= 1
            self.metrics.admission_active.set(self.active)
            self._slots.release()
            if self.active == 0 and self.waiting == 0:
                await run_in_threadpool(trim)
