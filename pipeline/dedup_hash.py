"""Image fingerprints for the dedup stage, and the vectorised search over them.

Three fingerprints per image, all from the decoded pixels (so a PNG and a BMP of the same image
agree):

- ``pixel_hash``: SHA-1 of the RGB pixels and shape, for exact duplicates;
- ``phash``: the perceptual hash imagededup and ImageHash use (grayscale, 32x32, 2-D DCT, the 8x8
  lowest frequencies compared with their median), packed into a uint64, to find candidates;
- ``thumb``: a small grayscale thumbnail, zero-mean and unit-norm, so that the dot product of two
  thumbnails is their Pearson correlation: blind to brightness and contrast changes, and sharp
  enough to tell two different handwritten digits of one class apart. Beside the whole image,
  thumbnails of crops (a few percent cut from every side, or from one side) let a cropped,
  zoomed or shifted copy be compared aligned: the similarity of two images is the best correlation of one's whole
  thumbnail with any thumbnail of the other.

We write the search ourselves because imagededup compares pairs in a Python loop (or a BK-tree)
and returns pairs, not groups; here one chunked numpy XOR + ``bitwise_count`` does all pairs.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.fft import dctn

from pipeline.data.images import ImageReadError, read_image
from pipeline.progress import bar

PHASH_SIZE = 32
PHASH_LOW = 8
_BIT_WEIGHTS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


@dataclass
class Fingerprints:
    """Fingerprints of ``n`` images, row ``i`` for image ``i``; ``errors[i]`` is set when unreadable."""

    pixel_hash: list[str]
    phash: np.ndarray  # (n,) uint64
    thumb: np.ndarray  # (n, 1 + crops [+ 1 mirrored], thumb_size**2) float32, zero mean, unit norm; [:, 0] whole
    level: np.ndarray  # (n, 2) float32: mean and standard deviation of the thumbnail in gray levels
    shape: np.ndarray  # (n, 2) int: height, width
    errors: list[str | None]


def gray(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def phash(gray_img: np.ndarray) -> np.uint64:
    """64-bit pHash: DCT of a 32x32 grayscale image, 8x8 low frequencies above their median.

    The median leaves out the DC term, as imagededup does, so overall brightness does not move it.
    """
    small = cv2.resize(gray_img, (PHASH_SIZE, PHASH_SIZE), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = dctn(small, type=2, norm="ortho")[:PHASH_LOW, :PHASH_LOW].ravel()
    bits = low > np.median(low[1:])
    return np.uint64(np.sum(_BIT_WEIGHTS[bits], dtype=np.uint64))


def thumbnail(gray_img: np.ndarray, size: int) -> tuple[np.ndarray, float, float]:
    """Zero-mean, unit-norm ``size`` x ``size`` thumbnail (flat float32), its mean and std in gray levels.

    A flat image (std near 0) gives zeros: its correlation with anything is 0.
    """
    t = cv2.resize(gray_img, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
    mean, std = float(t.mean()), float(t.std())
    t -= mean
    norm = float(np.linalg.norm(t))
    return (t / norm if norm > 1e-6 else t), mean, std


def pixel_hash(rgb: np.ndarray) -> str:
    h = hashlib.sha1(np.ascontiguousarray(rgb).tobytes())
    h.update(repr(rgb.shape).encode())
    return h.hexdigest()


Crop = tuple[float, float, float, float]  # fractions cut from the top, bottom, left and right


def crop(img: np.ndarray, cut: Crop) -> np.ndarray:
    h, w = img.shape[:2]
    top, bottom, left, right = (max(0.0, f) for f in cut)
    y0, y1 = int(round(h * top)), h - int(round(h * bottom))
    x0, x1 = int(round(w * left)), w - int(round(w * right))
    return img[y0:y1, x0:x1] if y1 - y0 >= 2 and x1 - x0 >= 2 else img


def alignment_crops(centre: Sequence[float], side: float) -> list[Crop]:
    """Centre crops (zoomed copies) and, when ``side`` > 0, one-sided crops (shifted copies)."""
    cuts = [(f, f, f, f) for f in centre if f > 0]
    if side > 0:
        cuts += [(side, 0, 0, 0), (0, side, 0, 0), (0, 0, side, 0), (0, 0, 0, side)]
    return cuts


def _one(path: str, thumb_size: int, crops: Sequence[Crop], mirror: bool, reader=read_image,
         known_hash: str | None = None) -> tuple:
    try:
        rgb = reader(path)
    except ImageReadError as exc:
        empty = np.zeros((1 + len(crops) + mirror, thumb_size * thumb_size), np.float32)
        return "", np.uint64(0), empty, (0.0, 0.0), (0, 0), str(exc).split(": ", 1)[-1]
    g = gray(rgb)
    t, mean, std = thumbnail(g, thumb_size)
    variants = [t] + [thumbnail(crop(g, c), thumb_size)[0] for c in crops]
    if mirror:
        variants.append(thumbnail(cv2.flip(g, 1), thumb_size)[0])
    return known_hash or pixel_hash(rgb), phash(g), np.stack(variants), (mean, std), rgb.shape[:2], None


def fingerprint_images(paths: Sequence[str], thumb_size: int, workers: int = 2, progress: bool = True,
                       crops: Sequence[Crop] = (), mirror: bool = False, reader=read_image,
                       pixel_hashes: Sequence[str] | None = None) -> Fingerprints:
    """Decode and fingerprint every image, ``workers`` threads at a time, with a progress bar.

    Threads suffice: OpenCV decoding, resizing and the DCT release the GIL.

    Args:
        reader: ``path -> RGB uint8``: the originals, or the resized-image cache's reader.
        pixel_hashes: the originals' exact-duplicate hashes when known (the cache computed them
            while decoding), so that exact still means same original pixels.
    """
    known = list(pixel_hashes) if pixel_hashes is not None else [None] * len(paths)

    def run(pool_map) -> list:
        return list(bar(pool_map(lambda pk: _one(pk[0], thumb_size, crops, mirror, reader, pk[1]),
                                 zip(paths, known)), total=len(paths),
                        desc="hashing images", unit="img", enabled=progress, mininterval=0.5))

    if workers <= 1:
        results = run(map)
    else:
        with ThreadPoolExecutor(workers) as pool:
            results = run(pool.map)
    n = len(results)
    return Fingerprints(
        pixel_hash=[r[0] for r in results],
        phash=np.array([r[1] for r in results], dtype=np.uint64).reshape(n),
        thumb=np.stack([r[2] for r in results]) if n else np.zeros((0, 1 + len(crops) + mirror, thumb_size**2),
                                                                    np.float32),
        level=np.array([r[3] for r in results], dtype=np.float32).reshape(n, 2),
        shape=np.array([r[4] for r in results], dtype=int).reshape(n, 2),
        errors=[r[5] for r in results],
    )


def _chunks(n: int, rows: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def _byte_mask(byte: int) -> np.uint64:
    return np.uint64(int.from_bytes(bytes([byte]) * 8, "little"))


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def hamming_pairs(hashes: np.ndarray, max_distance: int, rows: int = 256, cols: int = 4096,
                  workers: int = 1, backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """All pairs ``i < j`` whose 64-bit hashes differ in at most ``max_distance`` bits.

    ``backend``: ``faiss`` (a FAISS binary index: SIMD popcounts, about 3x faster per core than
    the numpy search below, measured by ``benchmarks/dedup.py``), ``numpy``, or ``auto`` (FAISS
    when installed). Both give the same pairs.

    The upper triangle of the all-pairs matrix is done in ``rows`` x ``cols`` blocks with
    preallocated buffers that stay in the CPU cache: an XOR, a ``bitwise_count`` to one byte per
    pair, then a SWAR test of eight counts at once (one uint64 add and mask) so that only blocks
    and words holding a hit are looked at pair by pair. 100,000 hashes (5e9 pairs) take about 10 s
    on one core. Bands of rows run on ``workers`` threads (numpy releases the GIL).

    Returns:
        ``(pairs, distances)``: an (m, 2) int64 array of index pairs and their Hamming distances.
    """
    n = len(hashes)
    cols = max(8, cols - cols % 8)
    if n < 2 or max_distance < 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.uint8)
    if backend == "faiss" or (backend == "auto" and max_distance < 64 and faiss_available()):
        return _faiss_pairs(np.asarray(hashes, np.uint64), max_distance, workers)
    if max_distance >= 64:
        i, j = np.triu_indices(n, 1)
        h = np.asarray(hashes, np.uint64)
        return np.stack([i, j], axis=1).astype(np.int64), np.bitwise_count(h[i] ^ h[j])
    # Pad to a multiple of 8 so counts can be read as whole uint64 words; padded columns are dropped.
    h = np.zeros(n + (-n) % 8, np.uint64)
    h[:n] = hashes
    # Adding 127 - max_distance to a count byte (<= 64) sets its high bit exactly when count > max.
    add, high = _byte_mask(127 - max_distance), _byte_mask(0x80)

    def band(a: int) -> tuple[np.ndarray, np.ndarray]:
        b = min(n, a + rows)
        found_i, found_j, found_d = [], [], []
        buffers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for c in range(a - a % 8, len(h), cols):
            d = min(len(h), c + cols)
            if (d - c) not in buffers:
                buffers[d - c] = (np.empty((b - a, d - c), np.uint64), np.empty((b - a, d - c), np.uint8))
            x, count = buffers[d - c]
            np.bitwise_xor(h[a:b, None], h[None, c:d], out=x)
            np.bitwise_count(x, out=count)
            words = count.view(np.uint64)
            np.add(words, add, out=x[:, : words.shape[1]])
            flags = np.bitwise_and(np.bitwise_not(x[:, : words.shape[1]]), high)
            if not flags.any():
                continue
            wi, wj = np.nonzero(flags)
            eight = count.reshape(b - a, -1, 8)[wi, wj]  # (m, 8) counts of the flagged words
            k, byte = np.nonzero(eight <= max_distance)
            i, j = wi[k] + a, wj[k] * 8 + byte + c
            keep = (j > i) & (j < n)
            found_i.append(i[keep])
            found_j.append(j[keep])
            found_d.append(eight[k, byte][keep])
        if not found_i:
            return np.zeros((0, 2), np.int64), np.zeros(0, np.uint8)
        return (np.stack([np.concatenate(found_i), np.concatenate(found_j)], axis=1).astype(np.int64),
                np.concatenate(found_d))

    starts = list(range(0, n, rows))
    if workers > 1 and len(starts) > 1:
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(band, starts))
    else:
        parts = [band(a) for a in starts]
    return np.concatenate([p for p, _ in parts]), np.concatenate([d for _, d in parts])


def _faiss_pairs(hashes: np.ndarray, max_distance: int, workers: int, block: int = 65536
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``hamming_pairs`` by FAISS's exhaustive binary index, one band of queries at a time.

    Each band of ``block`` hashes searches only itself and the hashes after it (the upper triangle:
    half the work of searching everything), and holds only that band's hits in RAM.
    """
    import faiss

    n = len(hashes)
    codes = np.ascontiguousarray(hashes).view(np.uint8).reshape(n, 8)  # popcounts ignore byte order
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, workers))
    found_i, found_j, found_d = [], [], []
    try:
        for a in range(0, n, block):
            b = min(n, a + block)
            index = faiss.IndexBinaryFlat(64)
            index.add(codes[a:])
            lims, dist, idx = index.range_search(codes[a:b], max_distance + 1)  # radius is exclusive
            i = np.repeat(np.arange(a, b), np.diff(lims).astype(np.int64))
            j = idx + a
            keep = j > i
            found_i.append(i[keep])
            found_j.append(j[keep])
            found_d.append(dist[keep].astype(np.uint8))
    finally:
        faiss.omp_set_num_threads(threads)
    pairs = np.stack([np.concatenate(found_i), np.concatenate(found_j)], axis=1).astype(np.int64)
    return pairs, np.concatenate(found_d)


def pair_correlation(thumbs: np.ndarray, pairs: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Aligned similarity of each pair (vectorised, in chunks of pairs).

    The best correlation of one image's whole thumbnail with any thumbnail (whole or crop) of the
    other, both ways round.
    """
    out = np.empty(len(pairs), np.float32)
    for a, b in _chunks(len(pairs), chunk):
        i, j = pairs[a:b, 0], pairs[a:b, 1]
        one = np.matmul(thumbs[j], thumbs[i, 0][:, :, None])[:, :, 0].max(axis=1)
        if thumbs.shape[1] > 1:
            other = np.matmul(thumbs[i, 1:], thumbs[j, 0][:, :, None])[:, :, 0].max(axis=1)
            one = np.maximum(one, other)
        out[a:b] = one
    return out


def similarity_matrix(thumbs_a: np.ndarray, thumbs_b: np.ndarray) -> np.ndarray:
    """Aligned similarity of every image of ``thumbs_a`` with every image of ``thumbs_b``."""
    g = thumbs_a[:, 0] @ thumbs_b[:, 0].T
    for v in range(1, thumbs_a.shape[1]):
        np.maximum(g, thumbs_a[:, 0] @ thumbs_b[:, v].T, out=g)
        np.maximum(g, thumbs_a[:, v] @ thumbs_b[:, 0].T, out=g)
    return g


def nearest_neighbours(thumbs: np.ndarray, k: int, shortlist: int = 48, also: Sequence[int] = (),
                       chunk_cells: int = 1 << 24, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Each image's ``k`` most similar other images.

    One chunked matrix product of the whole-image thumbnails (and one more per variant index in
    ``also``, e.g. the mirrored thumbnail) shortlists each image's ``shortlist`` nearest (BLAS does the work: 27,000 images in seconds); their aligned
    similarity (``pair_correlation``) then ranks them.

    Returns:
        ``(idx, r)``: (n, k) neighbour indices and similarities, best first.
    """
    n = len(thumbs)
    k_eff = min(k, max(n - 1, 0))
    m = min(max(shortlist, k_eff), max(n - 1, 0))
    idx = np.zeros((n, k_eff), np.int64)
    r = np.zeros((n, k_eff), np.float32)
    if k_eff == 0:
        return idx, r
    whole = np.ascontiguousarray(thumbs[:, 0])
    rows = max(1, min(n, chunk_cells // n))
    for a, b in bar(list(_chunks(n, rows)), desc="neighbours", enabled=progress, leave=False):
        g = whole[a:b] @ whole.T
        for v in also:
            np.maximum(g, whole[a:b] @ thumbs[:, v].T, out=g)
        g[np.arange(b - a), np.arange(a, b)] = -np.inf  # not its own neighbour
        near = np.argpartition(-g, m - 1, axis=1)[:, :m]
        pairs = np.stack([np.repeat(np.arange(a, b), m), near.ravel()], axis=1)
        sim = pair_correlation(thumbs, pairs).reshape(b - a, m)
        order = np.argsort(-sim, axis=1)[:, :k_eff]
        idx[a:b] = np.take_along_axis(near, order, axis=1)
        r[a:b] = np.take_along_axis(sim, order, axis=1)
    return idx, r
