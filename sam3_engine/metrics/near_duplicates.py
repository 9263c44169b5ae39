"""Near-duplicate images: perceptual hashes of one image, and groups of images from hashes and CLIP embeddings.

Pure functions over PIL images and numpy arrays, shared by the dedup stage, its tests and its benchmark.

- ``perceptual_hashes``: the pHash (``imagehash.phash``, 64 bits) of an image, of its mirror image and of
  its four corner crops keeping ``CROP_KEEP`` of each side. pHash survives resizing and re-encoding
  (0-4 bits) but not a shift: cropping 5% off one corner moves it 10-20 bits; against the original's
  corner crops, such a crop moves 0-10.
- ``phash_edges``: pairs of images whose hashes lie within a Hamming distance, found with faiss
  binary indexes: every pair by brute force up to ``exact_up_to`` images (popcount over all pairs is
  exact, and up to about a million images faster than a graph on two cores), an HNSW graph
  above (approximate: ``neighbours`` per query; recall measured in BENCHMARKS.md).
- ``clip_edges``: pairs whose CLIP embeddings have a cosine at or above a threshold: faiss inner
  product, flat (exact) up to ``exact_up_to`` images, an inverted file above.
- ``connected_groups``: the groups, connected components of the edges (scipy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

CROP_KEEP = 0.93
"""Share of each side a corner crop keeps: up to ~7% cut off a corner stays within a few bits of one crop."""
REDUCE_TO = 256
"""Images are first reduced by an integer box filter to a short side of REDUCE_TO to 2 x REDUCE_TO pixels:
pHash looks at 32 x 32 pixels, and six hashes of a 12-megapixel photo would otherwise cost more than its decoding."""
CORNERS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0))

PHASH, MIRRORED, CROP, CLIP = 1, 2, 4, 8
"""Edge kinds, as bit flags: the hashes match as they are, one matches the other's mirror image, one matches a
corner crop of the other, or the CLIP embeddings are close."""
KIND_NAMES = {PHASH: "phash", MIRRORED: "mirrored", CROP: "crop", CLIP: "clip"}

HNSW_LINKS = 32
"""Graph degree of the HNSW indexes (faiss ``M``)."""
HNSW_EF_SEARCH = 256
"""Candidates an HNSW search keeps: among a million images of random 64-bit hashes (the worst case: no structure)
it finds 99.9% of neighbours 4 bits away and 92.9% of those 10 bits away (BENCHMARKS.md)."""
IVF_PROBES = 16
"""Inverted lists a CLIP query visits: among a million random unit vectors it finds 98.5% of neighbours at cosine 0.95."""
MIN_SET_BITS = 16
"""A pHash with fewer bits set (or fewer unset) is a plain image's: photos, even dim or noisy ones, have 32 set."""
QUERY_BATCH = 65_536
"""Queries per index search: bounds the memory of results."""


def _bits(image_hash) -> int:
    """An ``imagehash.ImageHash`` as a signed 64-bit integer: its hex string's bits, two's complement."""
    return int(np.packbits(image_hash.hash.ravel()).view(">i8")[0])


def perceptual_hashes(image: Image.Image) -> tuple[int, int, list[int]]:
    """pHash of ``image`` (any mode), of its mirror image and of its four corner crops (top left, top right, bottom
    left, bottom right), each a signed 64-bit integer."""
    import imagehash  # its scipy and PyWavelets load in the workers that hash, not in every process that lists stages

    grey = image.convert("L")
    factor = max(1, min(grey.size) // REDUCE_TO)
    if factor > 1:
        grey = grey.reduce(factor)
    width, height = grey.size
    crop_w, crop_h = max(1, round(width * CROP_KEEP)), max(1, round(height * CROP_KEEP))
    crops = [
        grey.crop(
            (
                round((width - crop_w) * x),
                round((height - crop_h) * y),
                round((width - crop_w) * x) + crop_w,
                round((height - crop_h) * y) + crop_h,
            )
        )
        for x, y in CORNERS
    ]
    return _bits(imagehash.phash(grey)), _bits(imagehash.phash(ImageOps.mirror(grey))), [_bits(imagehash.phash(c)) for c in crops]


def informative(hashes: np.ndarray) -> np.ndarray:
    """Which pHashes say something about their image. pHash sets a bit per DCT coefficient above the median of 64, so a
    photo's hash has 32 bits set; on a plain image (one colour, a smooth gradient) the coefficients tie at the median and
    only a few bits are set, the same few for every plain image: such hashes link nothing."""
    bits = np.unpackbits(_codes(hashes), axis=1).sum(axis=1) if len(hashes) else np.zeros(0, np.int64)
    return (bits >= MIN_SET_BITS) & (bits <= 64 - MIN_SET_BITS)


def _codes(values: np.ndarray) -> np.ndarray:
    """Signed 64-bit hashes as faiss binary codes: 8 bytes each, big-endian."""
    return np.ascontiguousarray(np.asarray(values, dtype=np.int64).astype(">i8").view(np.uint8).reshape(-1, 8))


@dataclass(frozen=True)
class Edges:
    """Links between images (indices into the caller's list), with how close they are and how they were found."""

    first: np.ndarray
    second: np.ndarray
    kind: np.ndarray
    """Bit flags (``PHASH``, ``MIRRORED``, ``CROP``, ``CLIP``)."""
    distance: np.ndarray
    """pHash edges: Hamming distance in bits; CLIP edges: cosine similarity."""

    @staticmethod
    def none() -> Edges:
        return Edges(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.first)


def _kept(query_owner, index_owner, query_kind, index_kind, rows, found, distance) -> Edges:
    """Edges from search results (``rows``: query numbers, ``found``: index entries), without an image's links to itself."""
    first, second = query_owner[rows], index_owner[found]
    kind = query_kind[rows] | index_kind[found]
    kind = np.where(kind == 0, PHASH, kind).astype(np.uint8)
    other = first != second
    return Edges(first[other], second[other], kind[other], distance[other].astype(np.float32))


def phash_index(entries: np.ndarray, exact: bool):
    """A faiss index of 64-bit codes (``_codes``): ``IndexBinaryFlat`` (every pair, exact) or ``IndexBinaryHNSW``."""
    import faiss

    if exact:
        index = faiss.IndexBinaryFlat(64)
    else:
        index = faiss.IndexBinaryHNSW(64, HNSW_LINKS)
        index.hnsw.efSearch = HNSW_EF_SEARCH
    index.add(entries)
    return index


def phash_search(index, queries: np.ndarray, exact: bool, max_distance: int, nearest: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries within ``max_distance`` bits of each query: (query numbers, entries, distances). Exact: all of them
    (a range search); else among each query's ``nearest`` in the graph."""
    if exact:
        limits, distances, labels = index.range_search(queries, max_distance + 1)  # faiss keeps distances below the radius
        return np.repeat(np.arange(len(queries)), np.diff(limits).astype(np.int64)), labels, distances
    distances, labels = index.search(queries, nearest)
    rows, columns = np.nonzero((labels >= 0) & (distances <= max_distance))
    return rows, labels[rows, columns], distances[rows, columns]


def phash_edges(phash: np.ndarray, mirrored: np.ndarray, crops: np.ndarray, max_distance: int, neighbours: int, exact_up_to: int) -> Edges:
    """Pairs of images whose hashes are within ``max_distance`` bits.

    The index holds each image's hash and its mirror image's; the queries are each image's hash and its four
    corner crops' (``crops``, shape N x 4). So a copy, a mirrored copy, a slightly cropped copy and a mirrored
    cropped copy of a photo each match one of its entries. Up to ``exact_up_to`` images every pair is compared;
    above, each query looks at the ``neighbours`` nearest images in the graph (twice as many entries: an
    image's hash and its mirror image's are often both near).
    """
    count = len(phash)
    if count < 2:
        return Edges.none()
    exact = count <= exact_up_to
    entries = np.concatenate([phash, mirrored]).astype(np.int64)
    usable = informative(entries)  # a plain image's (or corner's) hash would link it to every other plain one
    entry_owner = np.tile(np.arange(count), 2)[usable]
    entry_kind = np.repeat(np.array([0, MIRRORED], np.uint8), count)[usable]
    asked = np.concatenate([phash, np.asarray(crops, np.int64).T.ravel()]).astype(np.int64)
    usable_query = informative(asked)
    queries = _codes(asked[usable_query])
    query_owner = np.tile(np.arange(count), 5)[usable_query]
    query_kind = np.repeat(np.array([0, CROP], np.uint8), [count, 4 * count])[usable_query]
    if not len(queries) or not len(entry_owner):
        return Edges.none()
    index = phash_index(_codes(entries[usable]), exact)
    found = []
    for start in range(0, len(queries), QUERY_BATCH):
        rows, labels, distances = phash_search(
            index, queries[start : start + QUERY_BATCH], exact, max_distance, min(2 * neighbours, 2 * count)
        )
        found.append(_kept(query_owner, entry_owner, query_kind, entry_kind, rows + start, labels, distances))
    return _closest_per_pair(_joined(found))


def _closest_per_pair(edges: Edges) -> Edges:
    """One edge per pair of images: the closest, and of equally close ones the plainest (phash, then mirrored, then crop)."""
    low, high = np.minimum(edges.first, edges.second), np.maximum(edges.first, edges.second)
    order = np.lexsort((edges.kind, edges.distance, high, low))
    low, high = low[order], high[order]
    first = np.ones(len(order), bool)
    first[1:] = (low[1:] != low[:-1]) | (high[1:] != high[:-1])
    return Edges(low[first], high[first], edges.kind[order][first], edges.distance[order][first])


def clip_index(vectors: np.ndarray, exact: bool):
    """A faiss inner-product index of unit vectors: ``IndexFlatIP`` (exact) or ``IndexIVFFlat`` (about 4 sqrt(N) lists,
    trained on a sample, ``IVF_PROBES`` visited per query)."""
    import faiss

    count, dim = vectors.shape
    if exact:
        index = faiss.IndexFlatIP(dim)
    else:
        lists = max(1, min(int(4 * np.sqrt(count)), count // 39))  # faiss wants 39 training points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(count, min(count, 64 * lists), replace=False)
        index.train(vectors[np.sort(sample)])
        index.nprobe = IVF_PROBES
    index.add(vectors)
    return index


def clip_edges(vectors: np.ndarray, min_cosine: float, neighbours: int, exact_up_to: int) -> Edges:
    """Pairs of images whose unit-length embeddings have a cosine of at least ``min_cosine``, among each image's
    ``neighbours`` nearest: every pair is compared up to ``exact_up_to`` images, an inverted file is searched above."""
    count = len(vectors)
    if count < 2:
        return Edges.none()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = clip_index(vectors, count <= exact_up_to)
    owner = np.arange(count)
    no_kind = np.zeros(count, np.uint8)
    found = []
    for start in range(0, count, QUERY_BATCH):
        similarity, labels = index.search(vectors[start : start + QUERY_BATCH], min(neighbours + 1, count))
        rows, columns = np.nonzero((labels >= 0) & (similarity >= min_cosine))
        edges = _kept(owner, owner, no_kind, no_kind, rows + start, labels[rows, columns], similarity[rows, columns])
        found.append(Edges(edges.first, edges.second, np.full(len(edges), CLIP, np.uint8), edges.distance))
    return _joined(found)


def _joined(parts: list[Edges]) -> Edges:
    if not parts:
        return Edges.none()
    return Edges(*(np.concatenate([getattr(p, name) for p in parts]) for name in ("first", "second", "kind", "distance")))


@dataclass(frozen=True)
class Groups:
    """Per image (in the caller's order): its group's number, the group's first image, its size, and the image's links."""

    label: np.ndarray
    first: np.ndarray
    """Index of the group's first image: with images sorted by id, the smallest id."""
    size: np.ndarray
    kinds: np.ndarray
    """Bit flags of the edges that touch the image."""
    phash_distance: np.ndarray
    """Smallest Hamming distance of its pHash edges; -1 without one."""
    clip_cosine: np.ndarray
    """Highest cosine of its CLIP edges; NaN without one."""

    def linked_by(self, image: int) -> list[str]:
        return [name for flag, name in KIND_NAMES.items() if self.kinds[image] & flag]


def connected_groups(count: int, *edge_sets: Edges) -> Groups:
    """Groups of ``count`` images: the connected components (``scipy.sparse.csgraph``) of every edge."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if count == 0:
        empty = np.zeros(0, np.int64)
        return Groups(empty, empty, empty, np.zeros(0, np.uint8), np.zeros(0, np.int32), np.zeros(0, np.float32))
    edges = _joined(list(edge_sets))
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges.first, edges.second)), shape=(count, count))
    _, label = connected_components(graph, directed=False)
    first = np.full(label.max() + 1, count, np.int64)
    np.minimum.at(first, label, np.arange(count))
    kinds = np.zeros(count, np.uint8)
    np.bitwise_or.at(kinds, edges.first, edges.kind)
    np.bitwise_or.at(kinds, edges.second, edges.kind)
    hashed = edges.kind != CLIP
    phash_distance = np.full(count, 65.0)
    for side in (edges.first, edges.second):
        np.minimum.at(phash_distance, side[hashed], edges.distance[hashed])
    clip_cosine = np.full(count, -np.inf)
    for side in (edges.first, edges.second):
        np.maximum.at(clip_cosine, side[~hashed], edges.distance[~hashed])
    return Groups(
        label,
        first[label],
        np.bincount(label)[label],
        kinds,
        np.where(phash_distance > 64, -1, phash_distance).astype(np.int32),
        np.where(np.isinf(clip_cosine), np.nan, clip_cosine).astype(np.float32),
    )
