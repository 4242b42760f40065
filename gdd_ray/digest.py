"""The digest of an image set: what the train stage trained on (results.json `train_set.digest`) and what an
export wrote, computed by one rule so the two can be compared.

sha256 over the labels (int64, in order), then every image's uint8 H x W x 3 pixels in the same order; the
first 16 hex digits. The same pixels, labels and order give the same digest, however they were read.
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np


def set_digest(labels: np.ndarray, images: np.ndarray) -> str:
    """The digest of N labels and N x H x W x 3 uint8 images held in memory."""
    d = SetDigest(labels)
    for i in range(len(images)):
        d.add(i, images[i])
    return d.hexdigest()


class SetDigest:
    """The same digest, fed image by image in any order (an export reads shard by shard, on several threads):
    images are hashed in position order as soon as their turn comes, the others wait in memory."""

    def __init__(self, labels: np.ndarray):
        self._hash = hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
        self._count = len(labels)
        self._next = 0
        self._waiting: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def add(self, position: int, pixels: np.ndarray) -> None:
        data = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
        with self._lock:
            self._waiting[position] = data
            while self._next in self._waiting:
                self._hash.update(self._waiting.pop(self._next))
                self._next += 1

    def hexdigest(self) -> str:
        if self._next != self._count:
            raise RuntimeError(f"digest of {self._next} of {self._count} images: the set was not read whole")
        return self._hash.hexdigest()[:16]
