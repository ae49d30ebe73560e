"""Start napari workers on the map's own thread pool, never on Qt's global one.

Why: napari starts workers on ``QThreadPool.globalInstance()``, which has one thread per
core (two on our machines). Qt also uses that pool *from the GUI thread* (e.g. to convert
the window's backing store when it repaints) and waits for it while holding the GIL,
because PyQt does not release the GIL around such calls. When every global-pool thread
runs a Python worker waiting for the GIL, the GUI thread waits for the pool and the
workers wait for the GUI thread: a deadlock (seen in our tests: two thumbnail workers
and one repaint). Workers on a private pool leave the global pool free for Qt.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import QThreadPool

#: Threads of the private pool: one long map (UMAP) job, thumbnails for the strip and
#: for the hover preview, the probe's retraining.
MAX_THREADS = 4

_pool: QThreadPool | None = None
_running: set[Any] = set()  # keeps started workers alive until they finish


def worker_pool() -> QThreadPool:
    """The thread pool of the map's background work (created on first use)."""
    global _pool
    if _pool is None:
        _pool = QThreadPool()
        _pool.setMaxThreadCount(MAX_THREADS)
    return _pool


def start_worker(worker: Any) -> Any:
    """Start a napari worker (made with ``_start_thread=False``) on :func:`worker_pool`.

    Connect the worker's signals before calling this. Returns the worker.
    """
    _running.add(worker)
    worker.finished.connect(lambda: _running.discard(worker))
    worker_pool().start(worker)
    return worker


def wait_for_workers(msecs: int = 10_000) -> bool:
    """Ask all running workers to quit and wait up to ``msecs``; True if all ended."""
    for worker in list(_running):
        worker.quit()
    return worker_pool().waitForDone(msecs)


class Lifeline:
    """Ties background workers to a widget's life.

    A worker may finish after its widget was deleted (napari deletes a closed dock
    widget without calling ``closeEvent``); its callbacks would then touch deleted Qt
    objects. Callbacks wrapped with :meth:`wrap` become no-ops once the owner is
    destroyed, and workers registered with :meth:`track` are asked to quit then.

    Parameters
    ----------
    owner : QObject
        The widget whose ``destroyed`` signal ends the line.
    """

    def __init__(self, owner: Any) -> None:
        self.alive = True
        self._workers: list[Any] = []
        owner.destroyed.connect(self.cut)

    def cut(self, *_args: Any) -> None:
        """Stop: later callbacks do nothing, running workers are asked to quit."""
        self.alive = False
        for worker in self._workers:
            worker.quit()
        self._workers.clear()

    def wrap(self, fn: Any) -> Any:
        """``fn`` if the owner is alive when called, else nothing."""

        def call(*args: Any) -> None:
            if self.alive:
                fn(*args)

        return call

    def track(self, worker: Any) -> Any:
        """Quit ``worker`` when the owner dies (before it is started). Returns it."""
        self._workers.append(worker)
        worker.finished.connect(lambda: self._forget(worker))
        return worker

    def _forget(self, worker: Any) -> None:
        if worker in self._workers:
            self._workers.remove(worker)
