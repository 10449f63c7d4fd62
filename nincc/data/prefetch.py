"""Background prefetch: a source runs in a thread that keeps a bounded queue of batches full.

Caffe's BasePrefetchingDataLayer does the same with PREFETCH_COUNT batches. Reading (LMDB,
LevelDB, HDF5), image decoding (Pillow) and most NumPy work release the GIL, so a thread overlaps
them with the jitted step. An error in the thread is raised by the consumer's next ``next()``.
"""

from __future__ import annotations

import queue
import threading

import numpy as np

from ..errors import DataError
from .sources import BatchSource


class Prefetcher(BatchSource):
    """Wraps a source; ``next()`` returns batches produced ahead by a background thread.

    Batches come in exactly the order the source produces them. ``depth`` is the queue bound
    (how many batches may wait). ``close()`` stops the thread and closes the source.
    """

    def __init__(self, source: BatchSource, depth: int = 4):
        if depth < 1:
            raise DataError(f"prefetch depth must be >= 1, got {depth}")
        self.source = source
        self.layer, self.tops = source.layer, source.tops
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=self._run, name=f"nincc-prefetch-{source.layer}", daemon=True
        )
        self._thread.start()

    def _put(self, item) -> bool:
        """Put unless stopping; False when the consumer has gone."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._put(self.source.next()):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)

    def produce(self) -> dict[str, np.ndarray]:
        if self._done:
            raise DataError(f"layer '{self.layer}': the prefetcher is closed")
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._done = True
        self._thread.join()
        self.source.close()
