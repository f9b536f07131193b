"""Where a training step's wall time goes, per step, when ``STTS_PHASE_TIMES=1`` is set (off
otherwise: every hook is a no-op). Used by ``tools/bench_train.py``.

The trainer's step window runs from one step's metrics to the next, so consecutive windows tile
the run: the window of step ``k`` holds step ``k-1``'s end-of-step callbacks, the wait for step
``k``'s batch and step ``k`` itself. Phases (seconds, exclusive: a nested phase pauses its parent):

* ``loader``     waiting for the next batch (the source's iterator: generation/decoding with
                 ``num_workers=0``, the balancer's planning);
* ``forward``, ``backward``, ``optimizer``   the engine's forward, backward and step, without
                 the time blocked in collectives inside them;
* ``comm``       blocked in collectives (every ``Work.wait`` of torch.distributed on the training
                 thread: ZeRO-3's parameter all-gathers, gradient reduce-scatters, the grad-norm
                 and loss all-reduces, the loop's stop check);
* ``logging``    the step-end callbacks (console, ``train_log.jsonl``, tracking);
* ``other``      the rest of the window (batch to device, the module's bookkeeping).

On CUDA every phase boundary synchronises the device, so kernels are charged to the phase that
launched them and an NCCL collective to ``comm`` (this removes compute/communication overlap:
a benchmark setting, never a production one).

Per step, every rank's phases are gathered (one small all-gather, outside the phases) and the
metrics hold ``phase/<name>_s`` (mean over ranks), ``phase/<name>_s_max`` / ``_min`` (over
ranks), ``phase/wall_s`` (mean window) and ``phase/ranks``.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Iterator, Optional

ENV = "STTS_PHASE_TIMES"
PHASES = ("loader", "forward", "backward", "optimizer", "comm", "logging", "other")


class PhaseTimer:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.totals: dict[str, float] = {}
        self._stack: list[list[Any]] = []        # [name, start of its current exclusive stretch]
        self._window_start = time.perf_counter()
        self._thread: Optional[int] = None
        self._record_comm = True
        self._cuda = False

    # -- clock -----------------------------------------------------------------------------------
    def _now(self) -> float:
        if self._cuda:
            import torch
            torch.cuda.synchronize()
        return time.perf_counter()

    def _enter(self, name: str) -> None:
        now = self._now()
        if self._stack:
            top = self._stack[-1]
            self.totals[top[0]] = self.totals.get(top[0], 0.0) + now - top[1]
        self._stack.append([name, now])

    def _exit(self) -> None:
        now = self._now()
        name, start = self._stack.pop()
        self.totals[name] = self.totals.get(name, 0.0) + now - start
        if self._stack:
            self._stack[-1][1] = now

    def phase(self, name: str):
        if not self.enabled or threading.get_ident() != self._thread:
            return contextlib.nullcontext()
        return self._phase(name)

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        self._enter(name)
        try:
            yield
        finally:
            self._exit()

    # -- the loop's hooks ------------------------------------------------------------------------
    def timed_batches(self, batches: Iterator) -> Iterator:
        """The trainer's batch iterator with each wait charged to ``loader``; starts the first window."""
        if not self.enabled:
            return batches
        return self._timed(batches)

    def _timed(self, batches: Iterator) -> Iterator:
        self._start()
        it = iter(batches)
        while True:
            with self.phase("loader"):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item

    def _start(self) -> None:
        import torch
        self._thread = threading.get_ident()
        self._cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        _install_wait_hook()
        self.totals.clear()
        self._stack.clear()
        self._window_start = self._now()

    def collect(self) -> dict[str, float]:
        """This step's window (see the module docstring) as ``phase/*`` metrics; starts the next."""
        if not self.enabled or self._thread is None:
            return {}
        now = self._now()
        wall = now - self._window_start
        named = [self.totals.get(p, 0.0) for p in PHASES[:-1]]
        mine = named + [wall - sum(named), wall]
        self.totals.clear()
        self._window_start = now
        rows = self._gather(mine)
        out: dict[str, float] = {}
        for i, p in enumerate(PHASES):
            col = [r[i] for r in rows]
            out[f"phase/{p}_s"] = sum(col) / len(col)
            out[f"phase/{p}_s_max"] = max(col)
            out[f"phase/{p}_s_min"] = min(col)
        out["phase/wall_s"] = sum(r[-1] for r in rows) / len(rows)
        out["phase/ranks"] = float(len(rows))
        return out

    def _gather(self, values: list[float]) -> list[list[float]]:
        import torch
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return [values]
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        every = torch.zeros(dist.get_world_size(), len(values), dtype=torch.float64, device=device)
        every[dist.get_rank()] = torch.tensor(values, dtype=torch.float64)
        self._record_comm = False            # the bench's own collective: not the trainer's
        try:
            dist.all_reduce(every)           # each rank fills its own row
        finally:
            self._record_comm = True
        return every.tolist()


TIMER = PhaseTimer(os.environ.get(ENV, "") not in ("", "0"))


def phase(name: str):
    """``with phase("forward"): ...`` -- a no-op unless ``STTS_PHASE_TIMES=1``."""
    return TIMER.phase(name)


def timed_batches(batches: Iterator) -> Iterator:
    return TIMER.timed_batches(batches)


def collect() -> dict[str, float]:
    return TIMER.collect()


_HOOKED = False


def _install_wait_hook() -> None:
    """Charge every ``Work.wait`` on the training thread to ``comm`` (gloo: the thread blocks
    there while the collective runs; synchronous collectives wait through it too)."""
    global _HOOKED
    if _HOOKED:
        return
    try:
        from torch._C._distributed_c10d import Work
    except ImportError:          # torch without distributed support
        return
    original = Work.wait

    def wait(self, *args, **kwargs):
        if not TIMER._record_comm:
            return original(self, *args, **kwargs)
        with TIMER.phase("comm"):
            return original(self, *args, **kwargs)

    Work.wait = wait
    _HOOKED = True
