"""Round-robin timing shared by the benchmark scripts: each round calls every function once,
so load from other processes on the machine falls on all of them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def round_robin(
    fns: dict[str, Callable[[], object]],
    runs: int,
    warmup: int,
    sync: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds of each function over ``runs`` rounds, after ``warmup`` untimed rounds.

    Args:
        fns: label -> function to time.
        runs: timed rounds.
        warmup: untimed rounds first.
        sync: called before starting and before stopping the clock (``torch.cuda.synchronize``
            on a GPU, so the time covers the kernels and not only their launch).
        clock: the clock (wall time by default; ``time.process_time`` counts this process's
            CPU time only, which other jobs on a shared machine disturb far less).
    """
    times = round_robin_times(fns, runs, warmup, sync, clock)
    return {label: statistics.median(t) for label, t in times.items()}


def round_robin_times(
    fns: dict[str, Callable[[], object]],
    runs: int,
    warmup: int,
    sync: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Every timed round's seconds of each function (see `round_robin`)."""
    times: dict[str, list[float]] = {label: [] for label in fns}
    for round_ in range(warmup + runs):
        for label, fn in fns.items():
            if sync is not None:
                sync()
            start = clock()
            fn()
            if sync is not None:
                sync()
            if round_ >= warmup:
                times[label].append(clock() - start)
    return times


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux) and its core count, for every figure."""
    import os
    import platform
    from pathlib import Path

    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({os.cpu_count()} cores)"
