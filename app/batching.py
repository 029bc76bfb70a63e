"""Cross-request batching: concurrent requests share one model call.

Each request's worker thread calls ``Batcher.run(images)`` and blocks until its rows come
back. ``workers`` threads (one per batch the runtime can run at once) each take the oldest
waiting job, add whatever else is waiting, up to ``max_batch`` images, waiting at most
``max_wait_s`` for more, run the model once and hand every job its rows. Given
``in_flight`` (how many requests are being assessed, e.g. the admission count), a worker
waits only while one of them has not yet brought its job: a lone request goes straight to
the model instead of idling ``max_wait_s`` for company that cannot come. With
``max_batch=1`` it degenerates to one model call per request over the runtime's pool of
asynchronous infer requests (the alternative the benchmark compares).

A failed model call fails only the jobs of that batch, each with the same exception.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger("app.batching")

Outputs = dict[str, np.ndarray]


@dataclass
class _Job:
    images: np.ndarray
    future: Future[Outputs] = field(default_factory=Future)


class Batcher:
    """Gathers ``run`` calls from many threads into batched calls of ``model``."""

    def __init__(
        self,
        model: Callable[[np.ndarray], Outputs],
        max_batch: int = 8,
        max_wait_s: float = 0.002,
        workers: int = 1,
        on_batch: Callable[[int], None] | None = None,
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        if max_batch < 1 or workers < 1 or max_wait_s < 0:
            raise ValueError("max_batch and workers must be >= 1, max_wait_s >= 0")
        self._model = model
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._in_flight = in_flight
        self._lock = threading.Lock()
        self._executing = 0  # jobs inside a model call right now (all workers)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._loop, name=f"batcher-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def run(self, images: np.ndarray) -> Outputs:
        """The model's outputs for ``images`` ([n, ...]); blocks the calling thread."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        job = _Job(np.ascontiguousarray(images))
        self._jobs.put(job)
        return job.future.result()

    def close(self) -> None:
        """Stop the workers once the jobs already queued are done."""
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout=30)

    def _gather(self, first: _Job) -> tuple[list[_Job], _Job | None, bool]:
        """``first`` plus jobs that fit; the job that did not fit; whether to stop after."""
        jobs, size = [first], len(first.images)
        deadline = time.perf_counter() + self.max_wait_s
        while size < self.max_batch:
            try:
                remaining = deadline - time.perf_counter()
                wait = remaining > 0 and self._may_come(len(jobs))
                job = self._jobs.get(timeout=remaining) if wait else self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, None, True
            if size + len(job.images) > self.max_batch:
                return jobs, job, False
            jobs.append(job)
            size += len(job.images)
        return jobs, None, False

    def _may_come(self, gathered: int) -> bool:
        """Whether a request being assessed may still bring a job (always, without
        ``in_flight``): more in flight than jobs gathered, queued or in a model call."""
        if self._in_flight is None:
            return True
        with self._lock:
            executing = self._executing
        return self._in_flight() > gathered + executing + self._jobs.qsize()

    def _loop(self) -> None:
        carried: _Job | None = None
        while True:
            first = carried if carried is not None else self._jobs.get()
            if first is None:
                return
            jobs, carried, stop = self._gather(first)
            self._execute(jobs)
            if stop:
                if carried is not None:
                    self._execute([carried])
                return

    def _execute(self, jobs: list[_Job]) -> None:
        with self._lock:
            self._executing += len(jobs)
        try:
            images = jobs[0].images if len(jobs) == 1 else np.concatenate([j.images for j in jobs])
            outputs = self._model(images)
            if self._on_batch is not None:
                self._on_batch(len(images))
        except BaseException as exc:  # hand the failure to every waiting request
            for job in jobs:
                job.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            with self._lock:
                self._executing -= len(jobs)
        start = 0
        for job in jobs:
            end = start + len(job.images)
            job.future.set_result({k: v[start:end] for k, v in outputs.items()})
            start = end
