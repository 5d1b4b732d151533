"""The pHash candidate search on FAISS's binary index finds exactly the pairs of the numpy search."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.dedup_hash import _faiss_pairs, faiss_available, hamming_pairs

pytestmark = pytest.mark.skipif(not faiss_available(), reason="faiss-cpu is not installed")


def _hashes(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + \
        rng.integers(0, 2, n).astype(np.uint64)
    # near copies: a few bits flipped, some right at and beyond the distance limit
    for k, src in enumerate(rng.choice(n // 2, 60, replace=False)):
        bits = rng.choice(64, k % 18, replace=False)
        h[n // 2 + k] = h[src] ^ np.uint64(int(sum(1 << int(b) for b in bits)))
    return h


def _as_set(pairs: np.ndarray, dist: np.ndarray) -> set[tuple[int, int, int]]:
    return {(int(i), int(j), int(d)) for (i, j), d in zip(pairs, dist)}


@pytest.mark.parametrize("max_distance", [0, 6, 14])
def test_faiss_and_numpy_find_the_same_pairs(max_distance):
    h = _hashes(1500)
    numpy_pairs = _as_set(*hamming_pairs(h, max_distance, backend="numpy"))
    faiss_pairs = _as_set(*hamming_pairs(h, max_distance, backend="faiss", workers=2))
    assert faiss_pairs == numpy_pairs and all(i < j for i, j, _ in faiss_pairs)
    assert any(d == max_distance for *_, d in numpy_pairs) or max_distance == 0
    # bands smaller than the set: pairs across band boundaries are found once
    assert _as_set(*_faiss_pairs(h, max_distance, workers=1, block=64)) == numpy_pairs


def test_auto_uses_faiss_and_handles_tiny_inputs():
    assert len(hamming_pairs(np.zeros(1, np.uint64), 14)[0]) == 0
    pairs, dist = hamming_pairs(np.array([5, 5, 7], np.uint64), 1)
    assert _as_set(pairs, dist) == {(0, 1, 0), (0, 2, 1), (1, 2, 1)}
