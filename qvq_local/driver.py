"""Driving an event stream to its end: every event to the handlers, the final Result back, Ctrl-C kept.

A question's events (:meth:`qvq_local.model.Model.stream`) end with ``Finished``.  :func:`drive` hands each
to the caller's handlers (a renderer, a transcript) and returns the Result; on Ctrl-C, wherever it lands
(inside the generator while it decodes, or in a handler while it draws), the partial ``Finished`` is
still delivered and the ``KeyboardInterrupt`` re-raised with the partial result attached as ``result``.
``Model.ask`` and ``qvq ask`` both drive through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from qvq_local.events import Event, Finished, Result


def drive(
    events: Iterable[Event],
    *handlers: Callable[[Event], None],
    stop_requested: Callable[[], bool] | None = None,
) -> Result:
    """Pass every event to each handler and return the final Result.

    On Ctrl-C the partial ``Finished`` is still delivered to the handlers (even when the interrupt landed
    in a handler rather than in the generator), then the ``KeyboardInterrupt`` is re-raised with the
    partial result attached as ``result``.

    ``stop_requested`` is polled after each event; when it returns True the run is interrupted as if by
    Ctrl-C.  The CLI passes a flag its SIGINT handler sets, because a ``KeyboardInterrupt`` raised while a
    C library runs a Python callback (llama.cpp's log hook, for one) is swallowed by ctypes.
    """
    iterator = iter(events)
    result: Result | None = None

    def deliver(event: Event) -> None:
        nonlocal result
        if isinstance(event, Finished):
            result = event.result
        for handler in handlers:
            handler(event)

    try:
        for event in iterator:
            deliver(event)
            if stop_requested is not None and result is None and stop_requested():
                raise KeyboardInterrupt
    except KeyboardInterrupt as interrupt:
        if result is None or result.stop_reason != "interrupted":
            final = _finish_interrupted(iterator, result)
            if final is not None:
                try:
                    deliver(final)
                except KeyboardInterrupt:
                    pass
        interrupt.result = result  # type: ignore[attr-defined]
        raise
    if result is None:  # pragma: no cover - a stream always ends with Finished
        raise RuntimeError("the event stream ended without a Finished event")
    return result


def _finish_interrupted(iterator: Iterator[Event], result: Result | None) -> Finished | None:
    """Get the partial Finished out of a generator the interrupt did not reach (it landed in a handler)."""
    if result is not None:
        return None  # the question had finished; the interrupt came while drawing the end
    throw = getattr(iterator, "throw", None)
    if throw is None:
        return None
    try:
        event = throw(KeyboardInterrupt())
    except (KeyboardInterrupt, StopIteration):
        return None
    return event if isinstance(event, Finished) else None


__all__ = ["drive"]
