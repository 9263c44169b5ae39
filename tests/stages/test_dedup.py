"""Near-duplicates with known answers: planted variants of the real photos must share a group and a split,
distinct photos must not share one.

The planted corpus is each example photo resized, re-encoded at a low JPEG quality, cropped by 5% of
each side, mirrored, and all of it at once. It runs through the real stages: ingest, embed with the
tiny random-weight CLIP (whose embeddings dedup must refuse), dedup and splits, over Delta tables and
DuckDB. The CLIP path is checked with constructed embeddings, which the stage uses like a real model's.
"""

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageOps

from sam3_engine.app.pipeline import run_pipeline
from sam3_engine.dashboards.report import ReportData, gather, render
from sam3_engine.engine.config import load_config
from sam3_engine.engine.store import TableStore
from sam3_engine.metrics.near_duplicates import CLIP, clip_edges, connected_groups, informative, perceptual_hashes, phash_edges
from sam3_engine.schemas.tables import IMAGE_EMBEDDINGS, PAIR_VERIFICATIONS
from tests.helpers import rows

SALTS = ("sam3-engine", "a", "b", "c", "d", "e")
VARIANTS = ("resized", "jpeg_q20", "cropped", "mirrored", "combined")


def _crop(image, cut, rng):
    width, height = image.size
    keep_w, keep_h = round(width * (1 - cut)), round(height * (1 - cut))
    left, top = round((width - keep_w) * rng.random()), round((height - keep_h) * rng.random())
    return image.crop((left, top, left + keep_w, top + keep_h))


def _save(image, fmt, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory, photos_dir):
    """Each example photo and its five planted near-duplicates, named ``<photo>.<variant>``."""
    root = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(15)
    for path in sorted(photos_dir.glob("*.jpg")):
        shutil.copy(path, root / path.name)
        photo = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        width, height = photo.size
        small = photo.resize((width * 6 // 10, height * 6 // 10), Image.LANCZOS)
        planted = {
            "resized.png": _save(photo.resize((width // 2, height // 2), Image.LANCZOS), "PNG"),
            "jpeg_q20.jpg": _save(photo, "JPEG", quality=20),
            "cropped.jpg": _save(_crop(photo, 0.05, rng), "JPEG", quality=90),
            "mirrored.jpg": _save(ImageOps.mirror(photo), "JPEG", quality=90),
            "combined.jpg": _save(ImageOps.mirror(_crop(small, 0.05, rng)), "JPEG", quality=35),
        }
        for name, data in planted.items():
            (root / f"{path.stem}.{name}").write_bytes(data)
    return root


def _family(uri: str) -> str:
    return uri.rsplit("/", 1)[1].split(".")[0]


def _one_positive_pair_per_image(run_dir) -> None:
    rows_ = [
        {
            "pair_id": f"pair-{r['image_id']}",
            "image_id": r["image_id"],
            "concept_id": "c",
            "phrase": "thing",
            "presence_probability": 0.9,
            "presence": "present",
            "presence_reason": "signals_agree",
            "accepted_masks": 1,
            "uncovered_fraction": 0.0,
            "exhaustivity": "exhaustive",
            "exhaustivity_reason": "covered",
            "verifier": "v1",
            "verifier_version": "test",
            "thresholds": "{}",
        }
        for r in rows(run_dir, "SELECT image_id FROM images")
    ]
    TableStore(str(run_dir)).replace(PAIR_VERIFICATIONS, "v1", pa.Table.from_pylist(rows_, schema=PAIR_VERIFICATIONS.schema))


def _families_per_split(run_dir, salt):
    """Per family, the splits its pairs were dealt to, and the splits stage's counts."""
    result = run_pipeline(load_config(None, {"output": str(run_dir), "stages": "splits", "splits.salt": salt}))
    placed: dict[str, set] = {}
    for r in rows(run_dir, "SELECT i.uri, s.split FROM splits s JOIN images i USING (image_id)"):
        placed.setdefault(_family(r["uri"]), set()).add(r["split"])
    return placed, result.stages[0].counts


@pytest.fixture(scope="module")
def planted_run(ray_cluster, planted_dir, tmp_path_factory):
    """The planted corpus through ingest, embed (tiny-random) and dedup, with one verified pair per image. Tests may deal
    the splits again (each with the salts it needs); nothing else changes."""
    run_dir = tmp_path_factory.mktemp("dedup") / "run"
    settings = {"input": str(planted_dir), "output": str(run_dir), "clip.model": "tiny-random", "ingest.unit_size": 4}
    run_pipeline(load_config(None, {**settings, "stages": "ingest,embed"}))
    _one_positive_pair_per_image(run_dir)
    before = {salt: _families_per_split(run_dir, salt)[0] for salt in SALTS}
    result = run_pipeline(load_config(None, {**settings, "stages": "embed,dedup", "dedup.unit_size": 4}))
    return run_dir, result, before


def test_planted_variants_share_their_photos_group_and_split(planted_run):
    run_dir, result, before = planted_run
    groups = rows(run_dir, "SELECT i.uri, d.* FROM near_duplicates d JOIN images i USING (image_id)")
    assert len(groups) == 18 and {r["group_size"] for r in groups} == {6}
    by_family: dict[str, set] = {}
    for r in groups:
        by_family.setdefault(_family(r["uri"]), set()).add(r["group_id"])
        assert r["group_id"] == min(g["image_id"] for g in groups if _family(g["uri"]) == _family(r["uri"]))
        assert r["linked_by"] and "clip" not in r["linked_by"] and r["phash_distance"] <= 10 and r["clip_cosine"] is None
    assert len(by_family) == 3 and all(len(ids) == 1 for ids in by_family.values())
    counts = result.stages[-1].counts
    assert (counts["images"], counts["groups"], counts["images_in_groups"], counts["largest_group"]) == (18, 3, 18, 6)
    assert counts["clip_links_off"] == "tiny-random" and any("pHash only" in notice for notice in result.notices)
    assert any(len(splits) > 1 for placed in before.values() for splits in placed.values())  # dealt per image, families leaked
    for salt in SALTS:
        placed, split_counts = _families_per_split(run_dir, salt)
        assert all(len(splits) == 1 for splits in placed.values()), (salt, placed)
        assert split_counts["groups_in_two_splits"] == 0 and split_counts["images_in_two_splits"] == 0


def test_the_tiny_random_clip_would_merge_unrelated_photos(planted_run):
    """Why dedup refuses random-weight embeddings: at the default cosine they join the three photos into one group."""
    run_dir, _, _ = planted_run
    embedded = rows(run_dir, "SELECT i.uri, e.embedding, e.model FROM image_embeddings e JOIN images i USING (image_id)")
    assert {r["model"] for r in embedded} == {"tiny-random"}
    groups = connected_groups(len(embedded), clip_edges(np.array([r["embedding"] for r in embedded], np.float32), 0.95, 10, 1000))
    families = {_family(r["uri"]) for r in embedded}
    assert len(set(groups.label)) < len(families)


def test_the_index_above_exact_up_to_finds_the_same_groups(planted_run):
    run_dir, _, _ = planted_run
    stored = rows(run_dir, "SELECT * FROM image_hashes ORDER BY image_id")
    hashes = [np.array([r[c] for r in stored], np.int64) for c in ("phash", "phash_mirrored", "phash_crops")]
    exact = connected_groups(len(stored), phash_edges(*hashes, 10, 10, exact_up_to=1000))
    graph = connected_groups(len(stored), phash_edges(*hashes, 10, 10, exact_up_to=0))  # faiss IndexBinaryHNSW
    assert np.array_equal(exact.first, graph.first) and len(set(exact.label)) == 3


def test_hashes_are_imagehash_phash_of_the_image_its_mirror_and_its_corner_crops(photos_dir):
    import imagehash

    photo = Image.open(photos_dir / "groceries.jpg").convert("RGB")  # 800 x 534: reduced by 2 before hashing
    phash, mirrored, crops = perceptual_hashes(photo)
    grey = photo.convert("L").reduce(2)
    assert f"{phash & (2**64 - 1):016x}" == str(imagehash.phash(grey))
    assert f"{mirrored & (2**64 - 1):016x}" == str(imagehash.phash(ImageOps.mirror(grey)))
    width, height = grey.size
    assert f"{crops[3] & (2**64 - 1):016x}" == str(imagehash.phash(grey.crop((width - 372, height - 248, width, height))))
    assert perceptual_hashes(photo.convert("L")) == (phash, mirrored, crops)


@pytest.fixture(scope="module")
def distinct_dir(tmp_path_factory, photos_dir):
    """41 distinct photos: the tiles of a 4 x 4 (3 x 3 for the smallest) grid on each example photo; no two share a pixel."""
    root = tmp_path_factory.mktemp("distinct")
    for path in sorted(photos_dir.glob("*.jpg")):
        photo = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        grid = 3 if photo.width < 1000 else 4
        width, height = photo.width // grid, photo.height // grid
        for column in range(grid):
            for row in range(grid):
                tile = photo.crop((column * width, row * height, (column + 1) * width, (row + 1) * height))
                (root / f"{path.stem}-{column}-{row}.jpg").write_bytes(_save(tile, "JPEG", quality=90))
    return root


def test_distinct_photos_are_not_grouped_and_clip_links_only_what_it_finds_close(distinct_dir, tmp_path):
    run_dir = tmp_path / "run"
    settings = {"input": str(distinct_dir), "output": str(run_dir)}
    result = run_pipeline(load_config(None, {**settings, "stages": "ingest,dedup"}))
    groups = rows(run_dir, "SELECT * FROM near_duplicates")
    assert len(groups) == 41 and {r["group_size"] for r in groups} == {1}  # no false merge
    assert all(r["group_id"] == r["image_id"] and r["linked_by"] == [] and r["phash_distance"] is None for r in groups)
    assert result.stages[-1].counts["groups"] == 0 and result.stages[-1].counts["clip_links_off"] == "no_embeddings"
    (closest,) = rows(
        run_dir, "SELECT min(bit_count(xor(a.phash, b.phash))) AS bits FROM image_hashes a JOIN image_hashes b ON a.image_id < b.image_id"
    )
    assert closest["bits"] > 10  # the default distance has a margin on these photos

    # Embeddings of a real model (constructed): two tiles made close, the rest random. The stage links exactly those two.
    ids = [r["image_id"] for r in rows(run_dir, "SELECT image_id FROM images ORDER BY image_id")]
    vectors = np.random.default_rng(0).standard_normal((len(ids), 64)).astype(np.float32)
    vectors[1] = vectors[0] + 0.1 * vectors[1]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    model = "ViT-B-32/laion2b_s34b_b79k"
    embeddings = [
        {"image_id": i, "model": model, "embedding": v.tolist(), "unit_id": "constructed"} for i, v in zip(ids, vectors, strict=True)
    ]
    TableStore(str(run_dir)).replace(IMAGE_EMBEDDINGS, "constructed", pa.Table.from_pylist(embeddings, schema=IMAGE_EMBEDDINGS.schema))
    again = run_pipeline(load_config(None, {**settings, "stages": "dedup"})).stages[0]
    assert again.units_committed == 0 and again.units_skipped == again.units_total  # no image is hashed again
    grouped = rows(run_dir, "SELECT * FROM near_duplicates WHERE group_size > 1 ORDER BY image_id")
    assert [r["image_id"] for r in grouped] == ids[:2] and all(r["group_id"] == ids[0] and r["linked_by"] == ["clip"] for r in grouped)
    assert grouped[0]["clip_cosine"] == pytest.approx(float(vectors[0] @ vectors[1]), abs=1e-5) and "clip_links_off" not in again.counts


@pytest.mark.parametrize("exact_up_to", [1000, 0])
def test_clip_groups_are_the_planted_clusters_of_synthetic_vectors(exact_up_to):
    """Clusters of near-identical unit vectors among random ones, through the flat and the inverted-file index."""
    rng = np.random.default_rng(1)
    count, dim = 600, 64
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    planted = {i: (i // 3) * 3 for i in range(60)}  # 20 clusters of 3: each a copy of its first with a little noise
    for i, first in planted.items():
        if i != first:
            vectors[i] = vectors[first] + 0.1 * rng.standard_normal(dim).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    edges = clip_edges(vectors, 0.95, 10, exact_up_to)
    assert set(edges.kind) == {CLIP} and (edges.distance >= 0.95).all()
    groups = connected_groups(count, edges)
    assert [int(groups.first[i]) for i in range(60)] == list(planted.values())
    assert (groups.size[60:] == 1).all() and all(groups.linked_by(i) == ["clip"] for i in range(60))


def test_an_image_gone_before_hashing_is_a_reject_and_a_rerun_adds_no_rows(planted_dir, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(planted_dir, corpus)
    settings = {"input": str(corpus), "output": str(tmp_path / "run")}
    run_pipeline(load_config(None, {**settings, "stages": "ingest"}))
    (corpus / "truck.mirrored.jpg").write_bytes(b"gone bad since ingest")
    report = run_pipeline(load_config(None, {**settings, "stages": "dedup"})).stages[0]
    assert report.items_total == 18 and report.counts["reject_reasons"] == {"image_unreadable": 1}  # the run's reconciliation passed
    (reject,) = rows(tmp_path / "run", "SELECT * FROM rejects WHERE stage = 'dedup'")
    assert reject["reason"] == "image_unreadable" and reject["uri"].endswith("truck.mirrored.jpg") and reject["image_id"]
    assert reject["detail"] == f"UnidentifiedImageError: cannot identify image file {reject['uri']}"  # the file, not an object's address
    assert report.counts["images"] == 17 and report.counts["groups"] == 3
    count = "SELECT (SELECT count(*) FROM image_hashes) AS hashes, (SELECT count(DISTINCT image_id) FROM near_duplicates) AS grouped"
    assert rows(tmp_path / "run", count) == [{"hashes": 17, "grouped": 17}]
    again = run_pipeline(load_config(None, {**settings, "stages": "dedup"})).stages[0]
    assert again.units_committed == 0 and rows(tmp_path / "run", count) == [{"hashes": 17, "grouped": 17}]
    stricter = run_pipeline(load_config(None, {**settings, "stages": "dedup", "dedup.phash_max_distance": 0})).stages[0]
    assert stricter.units_committed == 0 and stricter.counts["images_in_groups"] < 17  # re-derived from the stored hashes
    assert rows(tmp_path / "run", count) == [{"hashes": 17, "grouped": 17}]


def test_the_report_and_the_query_command_show_the_groups(planted_run):
    run_dir, _, _ = planted_run
    _families_per_split(run_dir, "sam3-engine")  # dealt per group (the fixture's last deal was per image)
    data = gather(str(run_dir), gallery_per_concept=0)
    assert data.near_duplicates == {"images": 18, "groups": 3, "images_in_groups": 18, "largest_group": 6, "groups_in_two_splits": 0}
    assert [g["images"] for g in data.duplicate_groups] == [6, 6, 6]
    assert all(g["splits"] in ("train", "val", "test") for g in data.duplicate_groups)  # one split each
    page = render(data)
    assert "18 images hashed: 3 groups of near-duplicates hold 18 of them" in page and page.count('data-column="group_id"') == 3
    command = [sys.executable, "-m", "sam3_engine", "query", str(run_dir), "@near_duplicate_groups", "-f", "json"]
    queried = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    assert [(g["group_id"], g["images"]) for g in queried] == [(g["group_id"], 6) for g in data.duplicate_groups]
    hostile = {**data.duplicate_groups[0], "first_uris": "<script>alert(1)</script>", "linked_by": "<b>phash</b>"}
    page = render(ReportData("run", [], [], near_duplicates=data.near_duplicates, duplicate_groups=[hostile]))
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<b>phash</b>" not in page
    assert "dedup stage has not run" in render(ReportData("run", [], []))


def test_plain_images_link_to_nothing_and_a_photo_still_finds_its_copy(photos_dir):
    """One colour or a smooth gradient ties pHash's coefficients: every such image gets the same few bits set."""
    ramp = np.tile(np.linspace(0, 255, 640, dtype=np.uint8), (480, 1))
    plain = [Image.new("RGB", (640, 480), colour) for colour in ((0, 0, 0), (255, 255, 255), (200, 0, 0))]
    plain += [Image.fromarray(ramp), Image.fromarray(np.ascontiguousarray(ramp[:, ::-1])), Image.fromarray(np.ascontiguousarray(ramp.T))]
    photo = ImageOps.exif_transpose(Image.open(photos_dir / "truck.jpg"))
    copy = photo.resize((photo.width // 2, photo.height // 2))
    images = [*plain, photo, copy]
    hashes = [perceptual_hashes(image) for image in images]
    phash, mirrored, crops = (np.array([h[i] for h in hashes], np.int64) for i in range(3))
    assert not informative(phash[: len(plain)]).any() and informative(phash[len(plain) :]).all()
    for exact_up_to in (1000, 0):  # every pair, and faiss's HNSW graph
        edges = phash_edges(phash, mirrored, crops, 10, 10, exact_up_to)
        assert sorted(zip(edges.first.tolist(), edges.second.tolist(), strict=True)) == [(len(plain), len(plain) + 1)]
