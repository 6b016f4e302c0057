"""One model, one generation at a time: the queue in front of it.

The model is loaded once; its sessions are not thread-safe and it holds one KV cache's worth of memory, so
generations run one after another on a single worker thread.  At most ``queue`` requests wait behind the
running one; the next is refused (the app answers 429 with Retry-After).  A request takes its place with
:meth:`Worker.reserve` before it costs anything (its images are decoded only once it holds a place), and
hands the place to its job with :meth:`Worker.submit`, or back with :meth:`Ticket.release`.  A job whose
client has gone away is cancelled: if it is still waiting it gives its place back at once and never
starts, and if it is running its event generator is closed after the current token, which closes the
backend session and frees the model for the next job.  :meth:`Worker.stop` (the server shutting down) ends
the running job and the waiting ones with :class:`Stopping`, so their clients get an error, not silence.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

_END = object()


class QueueFull(Exception):
    pass


class Stopping(Exception):
    """The server is shutting down: a job it stopped (or never started) gets this before its end, so the
    request answers with an error instead of ending as if the answer were complete."""


@dataclass
class Job:
    """One request's generation: its events go to ``events`` (an asyncio queue) as they come."""

    make_events: Callable[[], Iterator]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    emitted: int = 0  # events produced (a cancelled job stops within one of noticing)
    worker: Worker | None = None  # set when queued: a job cancelled while waiting frees its place at once
    dequeued: bool = False  # left the waiting line (started, or gave its place back); under the worker's lock

    def cancel(self) -> None:
        self.cancelled.set()
        if self.worker is not None:
            self.worker._leave(self)

    def _put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Ticket:
    """A place in the queue, taken before the request's images are decoded; given to one job or released."""

    def __init__(self, worker: Worker):
        self._worker = worker
        self.held = True

    def release(self) -> None:
        """Give the place back (the request failed before it became a job); a no-op once submitted."""
        if self.held:
            self.held = False
            with self._worker._lock:
                self._worker.waiting -= 1


class Worker:
    """Runs jobs one at a time on its own thread; refuses a job when ``queue`` are already waiting."""

    def __init__(self, queue: int = 8):
        self.queue = queue
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qvq-serve")
        self._lock = threading.Lock()
        self.waiting = 0
        self.running = 0
        self.completed = 0
        self.cancelled = 0
        self.last_cancelled_events: int | None = None  # events a cancelled running job had produced
        self._stopping = threading.Event()

    def reserve(self) -> Ticket:
        """A place for one request; :class:`QueueFull` when one runs and ``queue`` already wait,
        :class:`Stopping` once the server is shutting down."""
        with self._lock:
            if self._stopping.is_set():
                raise Stopping
            if self.waiting + self.running >= self.queue + 1:  # one running, ``queue`` waiting
                raise QueueFull
            self.waiting += 1
        return Ticket(self)

    def submit(self, job: Job, ticket: Ticket | None = None) -> None:
        """Queue ``job`` in the place ``ticket`` holds (None: take one now, or raise :class:`QueueFull`)."""
        ticket = ticket or self.reserve()
        if not ticket.held:
            raise ValueError("this queue place was already used or released")
        if self._stopping.is_set():
            raise Stopping  # the ticket is still held: the caller releases it
        ticket.held = False
        job.worker = self
        self._pool.submit(self._run, job)

    def _leave(self, job: Job) -> None:
        """A waiting job's client left: its place is free now, not when the worker reaches the dead job."""
        with self._lock:
            if job.dequeued:
                return
            job.dequeued = True
            self.waiting -= 1
            self.cancelled += 1

    def _run(self, job: Job) -> None:
        with self._lock:
            if job.dequeued:  # cancelled while it waited: already counted, and nobody reads its events
                return
            job.dequeued = True
            self.waiting -= 1
            self.running += 1
        try:
            if job.cancelled.is_set() or self._stopping.is_set():
                if not job.cancelled.is_set():
                    job._put(Stopping())  # still waiting at shutdown: its client is told, not dropped
                with self._lock:
                    self.cancelled += 1
                return
            job.started = True
            events = job.make_events()
            ended = False  # ran to its end: the answer is complete whatever happens next
            try:
                for event in events:
                    job.emitted += 1
                    job._put(event)
                    if job.cancelled.is_set() or self._stopping.is_set():
                        break
                else:
                    ended = True
                if not ended and not job.cancelled.is_set():
                    job._put(Stopping())  # cut by shutdown: the client must not take it for a whole answer
            finally:
                close = getattr(events, "close", None)
                if close is not None:
                    close()  # GeneratorExit in the stream: the backend session is closed there
            with self._lock:
                if job.cancelled.is_set():
                    self.cancelled += 1
                    self.last_cancelled_events = job.emitted
                else:
                    self.completed += 1
        except BaseException as err:  # noqa: BLE001 - handed to the request, which answers with it
            job._put(err)
            with self._lock:
                self.completed += 1
        finally:
            with self._lock:
                self.running -= 1
            job._put(_END)

    def state(self) -> dict:
        with self._lock:
            return {
                "running": self.running,
                "waiting": self.waiting,
                "queue": self.queue,
                "completed": self.completed,
                "cancelled": self.cancelled,
                "last_cancelled_events": self.last_cancelled_events,
            }

    def stop(self) -> None:
        """Begin shutting down, without waiting: the running job stops after its current token, the waiting
        ones end without starting, each with :class:`Stopping`, and no new one is taken.  Called from the
        signal handler, so that answers end with an error while their connections are still open."""
        self._stopping.set()

    def shutdown(self) -> None:
        """Stop the running job after its current token, drop the waiting ones, and wait: the model may be
        closed once this returns (closing it under a running generation would crash the backend)."""
        self._stopping.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


END = _END
