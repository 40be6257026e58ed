"""The two ways defectforge turns a seed into randomness (one place for both).

* :func:`keyed_rng` - a ``numpy`` generator that depends only on the seed and a key
  (a category, a defect type, ...), so adding a group never shifts another group's
  numbers;
* :func:`derive_seed` - a 63-bit integer seed hashed from any parts (a sample's seed
  from the run seed, category, defect type and index).

    >>> a = keyed_rng(0, "good", "bottle").integers(0, 1000, 3)
    >>> b = keyed_rng(0, "good", "bottle").integers(0, 1000, 3)
    >>> bool((a == b).all()), derive_seed(0, "crack", 1) == derive_seed(0, "crack", 1)
    (True, True)
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Any

import numpy as np


def keyed_rng(seed: int, *key: Any) -> np.random.Generator:
    """A generator seeded by ``seed`` and the CRC-32 of every key part."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *(zlib.crc32(str(p).encode()) for p in key)]))


def derive_seed(*parts: Any) -> int:
    """A non-negative 63-bit seed: the first 8 bytes of sha256 over the ``|``-joined parts."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
