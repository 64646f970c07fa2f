"""Per-iteration cost of an Ignite engine's machinery over chosen iterations, from Ignite's two profilers.

``BasicTimeProfiler`` splits every iteration into dataflow (getting the batch), processing (the process function,
for a MONAI workflow ``_iteration`` *including* the handlers it fires inside, e.g. MONAI's decollation at
``MODEL_COMPLETED``) and event handlers (``GET_BATCH_*`` and ``ITERATION_*`` events); ``HandlersTimeProfiler``
times every handler of every event. Both start afresh at each ``engine.run()``, so :class:`EngineOverhead`
adds up the iterations chosen in each run: call :meth:`start` in an ``ITERATION_COMPLETED`` handler at the last
untimed iteration, :meth:`stop` at the last timed one (attach that handler after the engine's own, so theirs
have run), and :meth:`collect` once ``run()`` has returned.
"""

from __future__ import annotations

from collections import defaultdict

from ignite.engine import Engine, Events
from ignite.handlers.time_profilers import BasicTimeProfiler, HandlersTimeProfiler
from monai.engines.utils import IterationEvents

__all__ = ["EngineOverhead"]

IN_STEP = set(IterationEvents)  # MONAI fires these inside the process function
FETCH_EVENTS = (Events.GET_BATCH_STARTED, Events.GET_BATCH_COMPLETED)


class EngineOverhead:
    def __init__(self, engine: Engine, exclude: tuple[str, ...] = ()) -> None:
        """Attach both profilers; handlers whose name starts with one of ``exclude`` stay out of the table."""
        self.basic, self.handlers = BasicTimeProfiler(), HandlersTimeProfiler()
        self.basic.attach(engine)
        self.handlers.attach(engine)
        self.exclude = ("BasicTimeProfiler.", *exclude)
        self.steps = 0
        self.totals: dict[str, float] = defaultdict(float)  # seconds over all collected iterations
        self.per_handler: dict[tuple, float] = defaultdict(float)

    def _counts(self) -> dict[tuple, int]:
        return {(e, h): len(t) for e, hs in self.handlers.event_handlers_times.items() for h, t in hs.items()}

    def start(self) -> None:
        self._from = self._counts()

    def stop(self) -> None:
        self._to = self._counts()

    def collect(self, warm: int, iters: int) -> None:
        """Add iterations ``warm + 1 .. warm + iters`` (1-based) of the run that just ended; ``warm >= 1``."""
        # BasicTimeProfiler files iteration k under index k - 1 but its batch fetch under k - 2: Ignite counts the
        # iteration only after GET_BATCH_COMPLETED (so the first fetch of a run lands in the last slot).
        timed, fetched = slice(warm, warm + iters), slice(warm - 1, warm + iters - 1)
        basic = self.basic
        self.totals["dataflow"] += float(basic.dataflow_times[fetched].sum())
        self.totals["processing"] += float(basic.processing_times[timed].sum())
        for event in (*FETCH_EVENTS, Events.ITERATION_STARTED, Events.ITERATION_COMPLETED):
            times = basic.event_handlers_times[event][fetched if event in FETCH_EVENTS else timed]
            self.totals["handlers"] += float(times.sum())
        for (event, name), end in self._to.items():
            start = self._from.get((event, name), 0)
            self.per_handler[event, name] += sum(self.handlers.event_handlers_times[event][name][start:end])
        self.steps += iters

    def report(self, top: int = 12) -> list[str]:
        n = self.steps
        flow, proc, hand = (1000 * self.totals[k] / n for k in ("dataflow", "processing", "handlers"))
        step = flow + proc + hand
        shown = {key: t for key, t in self.per_handler.items() if not key[1].startswith(self.exclude)}
        in_step = 1000 * sum(t for (e, _), t in shown.items() if e in IN_STEP) / n
        lines = [
            f"  dataflow {flow:.1f} + processing {proc:.1f} + event handlers {hand:.1f} = {step:.1f} ms",
            f"  event handlers: {100 * hand / step:.2f} % of a step (target <= 5 %); adding the handlers fired inside "
            f"processing ({in_step:.2f} ms, decollation among them): {100 * (hand + in_step) / step:.2f} %",
            f"  HandlersTimeProfiler, top {top} handlers (ms per iteration, % of a step; * = inside processing):",
        ]
        names = self.handlers.event_handlers_names
        for t, e, h in sorted(((t, e, h) for (e, h), t in shown.items() if t > 0), key=lambda r: -r[0])[:top]:
            copies = names.get(e, []).count(h)
            label = f"{h} x{copies}" if copies > 1 else h
            event = f"{'*' if e in IN_STEP else ' '}{getattr(e, 'name', e)}"
            ms = 1000 * t / n
            lines.append(f"    {label[:62]:62s} {event:22s} {ms:8.2f} {100 * ms / step:6.2f} %")
        return lines
