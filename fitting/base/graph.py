"""CUDA-graph capture of fixed-shape steps: :class:`StepGraph`.

A Levenberg-Marquardt pass or an Adam step of the fitter launches hundreds of small
kernels; on a GPU their launch and CuPy's per-call host overhead cost more than the
arithmetic. A step whose device work has the same shape and the same kernels every time
(no host reads, all state in buffers that live across steps) can be captured once into a
CUDA graph and replayed with one launch.

:class:`StepGraph` wraps such a step, ``step()``, which reads and writes only device
buffers that exist before the first call (its temporaries may be anything):

* on NumPy it calls ``step()`` (nothing to capture);
* on CuPy the first call runs ``step()`` eagerly: a warm-up that compiles and loads the
  kernels and uploads the cached constants, none of which may happen during a capture
  (a step whose ``warm`` key already ran in this process skips it: its kernels and
  constants are in place, so the first call captures); the next call captures ``step()`` on a side stream (``Stream.begin_capture``), with
  a private memory pool that the graph keeps (a temporary of the capture is never handed
  to other code, which the graph's later launches would overwrite), and launches the
  graph on the current stream; later calls launch it again;
* if the capture fails (a CuPy or CUDA version without it, an operation that cannot be
  captured), the step runs eagerly from then on, with one warning; so does
  ``enabled=False`` (:attr:`p3dmm.fitting.FitConfig.cuda_graphs`) and the
  ``P3DMM_CUDA_GRAPHS=0`` environment variable.

Python code inside ``step()`` runs only at the warm-up and the capture: Python values
(loop counters, flags) are frozen in the graph, so everything that changes from step to
step must be a device array. The CPU tests replay the same captures on the CuPy
emulation (``tests/device_emulation.py``), which checks exactly that.
"""

from __future__ import annotations

import logging
import os
import warnings
import weakref
from collections.abc import Callable, Hashable
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["StepGraph", "graphs_enabled"]

log = logging.getLogger(__name__)

#: Per owner (e.g. the device model), the ``warm`` keys of steps that ran eagerly in this process.
_WARM: "weakref.WeakKeyDictionary[Any, set[Hashable]]" = weakref.WeakKeyDictionary()


def graphs_enabled(requested: bool = True) -> bool:
    """``requested`` unless the environment variable ``P3DMM_CUDA_GRAPHS`` is ``0``."""
    return requested and os.environ.get("P3DMM_CUDA_GRAPHS", "1").strip() not in ("0", "false", "no", "off")


class StepGraph:
    """A fixed-shape device step, replayed as a CUDA graph on CuPy (see the module docstring).

    Args:
        xp: the array module (NumPy: the step is simply called).
        step: the step; reads and writes device buffers that outlive it.
        name: for the log and the fallback warning.
        enabled: capture at all (False: always eager).
        warm: optional ``(owner, key)``: steps with the same key over the same owner (kept
            weakly) use the same kernels and cached constants, so once one has run
            eagerly, later ones are captured on their first call.

    Attributes:
        calls: how many times the step ran (eagerly or as a graph).
        launches: how many of those were graph launches.
        mode: ``"eager"``, ``"graph"`` or ``"fallback"`` (capture failed).
    """

    def __init__(self, xp: ModuleType, step: Callable[[], None], name: str, enabled: bool = True,
                 warm: tuple[Any, Hashable] | None = None) -> None:  # fmt: skip
        self.xp, self.step, self.name = xp, step, name
        self.enabled = xp is not np and graphs_enabled(enabled)
        if warm is not None:
            try:
                hash(warm[1])
            except TypeError:  # an unhashable key (e.g. a list in the config): always warm up
                warm = None
        self._warm = warm
        self._warm_up = not (self.enabled and warm is not None and warm[1] in _WARM.get(warm[0], ()))
        self._failed = 0
        self.graph: Any = None
        self._pool: Any = None
        self.calls = 0
        self.launches = 0
        self.mode = "graph" if self.enabled else "eager"

    def __call__(self) -> None:
        self.calls += 1
        if not self.enabled or (self.calls == 1 and self._warm_up):
            self.step()  # NumPy, graphs off, or the warm-up
            if self.enabled and self._warm is not None:
                _WARM.setdefault(self._warm[0], set()).add(self._warm[1])
            return
        if self.graph is None and not self._capture():
            self.step()
            return
        self.graph.launch(stream=self.xp.cuda.get_current_stream())
        self.launches += 1

    def _capture(self) -> bool:
        cuda = self.xp.cuda
        stream = cuda.Stream(non_blocking=True)
        pool = cuda.MemoryPool()
        try:
            with cuda.using_allocator(pool.malloc), stream:
                stream.begin_capture()
                try:
                    self.step()
                finally:
                    graph = stream.end_capture()
        except Exception as e:  # noqa: BLE001 - any failure to capture falls back to eager steps
            self._failed += 1
            if self._failed == 1 and not self._warm_up:
                # captured before any eager run: something still needed a first run here;
                # this call runs eagerly (a warm-up) and the next one captures again
                log.debug("%s: capture without warm-up failed (%s); warming up", self.name, e)
                return False
            self.enabled, self.mode = False, "fallback"
            warnings.warn(f"{self.name}: CUDA graph capture failed ({type(e).__name__}: {e}); running eagerly", RuntimeWarning, stacklevel=3)
            return False
        self.graph, self._pool = graph, pool
        log.debug("%s: captured a CUDA graph", self.name)
        return True
