import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sam3_engine.engine.catalog import named_query
from sam3_engine.engine.config import StorageConfig
from sam3_engine.engine.stage import content_defined_chunks
from sam3_engine.io.inputs import InputEntry, list_inputs
from sam3_engine.stages.ingest import REASONS, IngestConfig, Reject, probe
from tests.conftest import broken_files, odd_images
from tests.helpers import ingest, rows


def test_real_photos_probe_to_their_true_size(photos_dir):
    for name, size in {"groceries.jpg": (800, 534), "test_image.jpg": (1280, 720), "truck.jpg": (1800, 1200)}.items():
        path = photos_dir / name
        row = probe(InputEntry(uri=str(path), input_id="x"), IngestConfig(), StorageConfig())
        with Image.open(path) as image:
            assert (row["width"], row["height"]) == image.size == size
        assert row["format"] == "JPEG" and row["mode"] == "RGB"
        assert row["num_bytes"] == path.stat().st_size
        assert len(row["image_id"]) == 64


def test_quickstart_manifest_keeps_captions(tmp_path):
    from tests.conftest import EXAMPLES

    result = ingest(EXAMPLES / "manifest.jsonl", tmp_path / "run")
    images = rows(tmp_path / "run", "SELECT uri, captions, sources FROM images ORDER BY uri")
    assert [r["uri"].rsplit("/", 1)[1] for r in images] == ["groceries.jpg", "test_image.jpg", "truck.jpg"]
    assert "four paper grocery bags" in images[0]["captions"][0]
    assert all(r["sources"] == ["sam3-examples"] for r in images)
    assert result.stages[0].counts == {"images": 3, "duplicates": 0, "rejects": 0, "reject_reasons": {}}


def test_corpus_every_file_is_an_image_or_a_reject_with_the_exact_reason(corpus_dir, tmp_path):
    result = ingest(corpus_dir, tmp_path / "run", **{"ingest.unit_size": 3})
    run = tmp_path / "run"
    expected_rejects = {name: reason for name, (_, reason) in broken_files(b"").items()}
    got = {r["uri"].rsplit("/", 1)[1]: r for r in rows(run, "SELECT * FROM rejects")}
    assert {name: r["reason"] for name, r in got.items()} == expected_rejects
    assert all(r["detail"] and r["stage"] == "ingest" for r in got.values())
    assert set(expected_rejects.values()) <= REASONS.keys()

    sources = {r["uri"].rsplit("/", 1)[1]: r for r in rows(run, "SELECT * FROM sources")}
    for name, (_, expected) in odd_images().items():
        assert {k: sources[name][k] for k in expected} == expected, name
    assert ".hidden.jpg" not in sources and ".hidden.jpg" not in got

    listed = len([p for p in corpus_dir.rglob("*") if p.is_file() and not p.name.startswith(".")])
    counts = result.stages[0].counts
    assert result.stages[0].items_total == listed
    assert counts["images"] + counts["duplicates"] + counts["rejects"] == listed
    assert counts["duplicates"] == 1 and counts["rejects"] == len(expected_rejects)


def test_the_same_photo_under_two_paths_is_one_image_with_both_uris(corpus_dir, tmp_path):
    ingest(corpus_dir, tmp_path / "run")
    (truck,) = rows(tmp_path / "run", "SELECT * FROM images WHERE list_contains(uris, $uri)", {"uri": str(corpus_dir / "truck.jpg")})
    assert truck["uris"] == sorted([str(corpus_dir / "nested" / "truck-copy.jpg"), str(corpus_dir / "truck.jpg")])
    assert truck["uri"] == min(truck["uris"])
    assert rows(tmp_path / "run", "SELECT count(*) AS n FROM images WHERE image_id = $id", {"id": truck["image_id"]}) == [{"n": 1}]


def test_pixel_limit_and_format_list_are_configurable(photos_dir):
    entry = InputEntry(uri=str(photos_dir / "groceries.jpg"), input_id="x")
    with pytest.raises(Reject) as rejected:
        probe(entry, IngestConfig(max_pixels=800 * 534 - 1), StorageConfig())
    assert rejected.value.reason == "too_large"
    with pytest.raises(Reject) as rejected:
        probe(entry, IngestConfig(formats=("PNG",)), StorageConfig())
    assert rejected.value.reason == "unsupported_format"
    with pytest.raises(Reject) as rejected:
        probe(entry, IngestConfig(max_bytes=1000), StorageConfig())
    assert rejected.value.reason == "file_too_large"
    assert probe(entry, IngestConfig(max_pixels=800 * 534), StorageConfig())["width"] == 800


def test_manifest_bad_rows_and_missing_files_are_rejected_not_lost(photos_dir, tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    lines = [
        json.dumps(
            {"uri": str(photos_dir / "truck.jpg"), "caption": "a truck", "alt_text": "white truck", "phrases": "wheel; license plate"}
        ),
        json.dumps({"uri": str(photos_dir / "truck.jpg"), "caption": ["pickup", "canopy"], "phrases": ["wheel", "stairs"]}),
        json.dumps({"uri": "missing/photo.jpg"}),
        json.dumps({"uri": str(tmp_path)}),
        json.dumps({"caption": "no uri here"}),
        "{not json",
        json.dumps(["a", "list"]),
        "",
    ]
    manifest.write_text("\n".join(lines))
    result = ingest(manifest, tmp_path / "run")
    rejects = rows(tmp_path / "run", "SELECT uri, reason FROM rejects ORDER BY uri")
    assert sorted(r["reason"] for r in rejects) == ["bad_manifest_row", "bad_manifest_row", "bad_manifest_row", "missing", "unreadable"]
    assert any(r["uri"] == str(tmp_path / "missing" / "photo.jpg") for r in rejects)
    (truck,) = rows(tmp_path / "run", "SELECT * FROM images")
    assert truck["captions"] == ["a truck", "canopy", "pickup"] and truck["alt_texts"] == ["white truck"]
    assert truck["phrases"] == ["license plate", "stairs", "wheel"]
    assert result.stages[0].items_total == 7
    assert result.stages[0].counts["duplicates"] == 1


def test_csv_and_parquet_manifests(photos_dir, tmp_path):
    csv_path = tmp_path / "m.csv"
    csv_path.write_text(f"uri,caption\n{photos_dir / 'groceries.jpg'},bags in a trunk\n")
    pq.write_table(pa.table({"uri": [str(photos_dir / "truck.jpg")], "caption": ["a truck"]}), tmp_path / "m.parquet")
    for manifest, caption in ((csv_path, "bags in a trunk"), (tmp_path / "m.parquet", "a truck")):
        ingest(manifest, tmp_path / manifest.suffix[1:])
        assert [r["captions"] for r in rows(tmp_path / manifest.suffix[1:], "SELECT captions FROM images")] == [[caption]]


def test_coco_json_images_and_captions(photos_dir, tmp_path):
    coco = {
        "images": [{"id": 7, "file_name": "groceries.jpg"}, {"id": 8, "file_name": "truck.jpg"}, {"id": 9}],
        "annotations": [{"image_id": 7, "caption": "grocery bags"}, {"image_id": 7, "caption": "a car trunk"}],
    }
    path = tmp_path / "images" / "coco.json"
    path.parent.mkdir()
    for name in ("groceries.jpg", "truck.jpg"):
        (path.parent / name).write_bytes((photos_dir / name).read_bytes())
    path.write_text(json.dumps(coco))
    ingest(path, tmp_path / "run")
    images = rows(tmp_path / "run", "SELECT uri, captions FROM images ORDER BY uri")
    assert [(r["uri"].rsplit("/", 1)[1], r["captions"]) for r in images] == [
        ("groceries.jpg", ["a car trunk", "grocery bags"]),
        ("truck.jpg", []),
    ]
    assert rows(tmp_path / "run", "SELECT reason FROM rejects") == [{"reason": "bad_manifest_row"}]


def test_missing_input_is_a_clear_error(tmp_path):
    from sam3_engine.io.inputs import InputError

    with pytest.raises(InputError, match="does not exist"):
        list_inputs(str(tmp_path / "nowhere"), "auto", StorageConfig())
    (tmp_path / "m.csv").write_text("path\nx.jpg\n")
    with pytest.raises(InputError, match="no `uri` column"):
        list_inputs(str(tmp_path / "m.csv"), "auto", StorageConfig())


def test_chunks_are_stable_when_files_are_added():
    entries = [InputEntry(uri=f"s3://b/img{i:05d}.jpg") for i in range(2000)]
    before = list(content_defined_chunks(entries, lambda e: e.uri, 16))
    assert [e for shard in before for e in shard] == entries
    assert max(map(len, before)) <= 4 * 16
    assert 2000 / 16 * 0.7 < len(before) < 2000 / 16 * 1.3
    shards = {tuple(e.uri for e in s) for s in before}
    for i in range(0, 2000, 97):
        grown = sorted(entries + [InputEntry(uri=f"s3://b/img{i:05d}-new.jpg")], key=lambda e: e.uri)
        changed = {tuple(e.uri for e in s) for s in content_defined_chunks(grown, lambda e: e.uri, 16)} - shards
        assert 1 <= len(changed) <= 3, i


def test_a_worker_that_crashes_loses_only_its_input(synthetic_dir, tmp_path, monkeypatch):
    from sam3_engine.engine.runner import CRASH_ON_ENV

    monkeypatch.setenv(CRASH_ON_ENV, "img007.png")
    result = ingest(synthetic_dir, tmp_path / "run", **{"ingest.unit_size": 4, "ingest.workers": 2})
    (crashed,) = rows(tmp_path / "run", "SELECT uri, reason FROM rejects WHERE reason = 'worker_crashed'")
    assert crashed["uri"].endswith("img007.png")
    report = result.stages[0]
    assert report.worker_crashes >= 2
    assert report.counts["images"] + report.counts["duplicates"] + report.counts["rejects"] == report.items_total == 44
    assert report.counts["images"] == 39
    health = {row["stage"]: row["worker_crashes"] for row in rows(tmp_path / "run", named_query("run_health"))}
    assert health["ingest"] == 1  # the report's run health counts the input lost to crashes


def test_glob_input_lists_only_matching_files(corpus_dir, tmp_path):
    result = ingest(f"{corpus_dir}/**/*.png", tmp_path / "run")
    names = sorted(r["uri"].rsplit("/", 1)[1] for r in rows(tmp_path / "run", "SELECT uri FROM sources UNION ALL SELECT uri FROM rejects"))
    assert names == sorted(p.name for p in corpus_dir.rglob("*.png"))
    assert result.stages[0].items_total == len(names) > 3


def test_a_csv_row_with_a_quote_left_open_is_rejected_and_the_rows_it_swallowed_are_read(photos_dir, tmp_path):
    """The csv module reads an open quote on to the next quote: rows 3 and 4 became part of row 2's caption."""
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "uri,caption\n"
        f"{photos_dir / 'groceries.jpg'},bags in a trunk\n"
        f'{photos_dir / "truck.jpg"},"a truck\n'
        f'{photos_dir / "test_image.jpg"},"children\nplaying basketball"\n'
        f"{photos_dir / 'truck.jpg'},a pickup,with,extra fields\n"
    )
    result = ingest(manifest, tmp_path / "run")
    rejects = rows(tmp_path / "run", "SELECT uri, reason, detail FROM rejects ORDER BY uri")
    assert [(r["uri"], r["reason"]) for r in rejects] == [(f"{manifest}#line={n}", "bad_manifest_row") for n in (3, 6)]
    assert "not one CSV record" in rejects[0]["detail"] and "4 fields, the header has 2" in rejects[1]["detail"]
    images = rows(tmp_path / "run", "SELECT uri, captions FROM images ORDER BY uri")
    assert [(r["uri"].rsplit("/", 1)[1], r["captions"]) for r in images] == [
        ("groceries.jpg", ["bags in a trunk"]),
        ("test_image.jpg", ["children\nplaying basketball"]),
    ]
    assert result.stages[0].items_total == 4


def test_a_quoted_field_that_runs_into_a_row_is_rejected_even_when_a_later_quote_closes_it(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text('uri,caption\na.jpg,"an open quote\nb.jpg,the next row\nc.jpg,"\nd.jpg,"a caption\nover two lines"\n')
    entries = {e.uri.rsplit("/", 1)[-1]: e for e in list_inputs(str(manifest), "auto", StorageConfig())}
    assert sorted(entries) == ["b.jpg", "d.jpg", "manifest.csv#line=2", "manifest.csv#line=4"]
    assert "runs on into line 3" in entries["manifest.csv#line=2"].problem
    assert entries["d.jpg"].captions == ("a caption\nover two lines",)


def test_symbolic_links_are_followed_and_broken_ones_rejected(photos_dir, tmp_path):
    """fsspec lists a link as `other`: links to files and folders were neither ingested nor rejected."""
    import os

    folder, outside = tmp_path / "images", tmp_path / "outside"
    (folder / "sub").mkdir(parents=True)
    outside.mkdir()
    (folder / "truck.jpg").write_bytes((photos_dir / "truck.jpg").read_bytes())
    (outside / "groceries.jpg").write_bytes((photos_dir / "groceries.jpg").read_bytes())
    (folder / "file_link.jpg").symlink_to(photos_dir / "test_image.jpg")
    (folder / "folder_link").symlink_to(outside)
    (outside / "back").symlink_to(folder)  # followed through folder_link, it leads back into the input
    (folder / "dangling.jpg").symlink_to(folder / "nowhere.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    (folder / "sub" / "up").symlink_to(folder)
    os.mkfifo(folder / "pipe.jpg")
    result = ingest(folder, tmp_path / "run")
    sources = rows(tmp_path / "run", "SELECT uri FROM sources ORDER BY uri")
    assert [r["uri"].removeprefix(f"{folder}/") for r in sources] == ["file_link.jpg", "folder_link/groceries.jpg", "truck.jpg"]
    rejects = {r["uri"].removeprefix(f"{folder}/"): r["reason"] for r in rows(tmp_path / "run", "SELECT uri, reason FROM rejects")}
    assert rejects == {
        "dangling.jpg": "missing",
        "loop.jpg": "symlink_loop",
        "sub/up": "symlink_loop",
        "folder_link/back": "symlink_loop",
        "pipe.jpg": "unreadable",
    }
    assert result.stages[0].items_total == 8 and result.stages[0].counts["rejects"] == 5


def test_blank_per_image_phrases_are_kept_for_mining_to_reject_and_every_item_is_split(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    lines = [{"uri": "a.jpg", "phrases": "a;b;c"}, {"uri": "b.jpg", "phrases": ["wheel", " ", "", "x;y"]}, {"uri": "c.jpg", "phrases": " "}]
    manifest.write_text("\n".join(json.dumps(line) for line in lines))
    phrases = [e.phrases for e in list_inputs(str(manifest), "auto", StorageConfig())]
    assert phrases == [("a", "b", "c"), ("wheel", "", "", "x", "y"), ()]  # a blank `phrases` value is no phrases


def test_a_png_with_a_bad_header_checksum_is_corrupt(tmp_path):
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[29] ^= 0xFF  # the IHDR chunk's CRC: bytes 29-32
    (tmp_path / "bad_ihdr.png").write_bytes(bytes(data))
    with pytest.raises(Reject) as rejected:
        probe(InputEntry(uri=str(tmp_path / "bad_ihdr.png"), input_id="x"), IngestConfig(), StorageConfig())
    assert rejected.value.reason == "corrupt" and "bad header checksum" in rejected.value.detail


def test_http_uris_are_missing_only_when_the_server_says_so(photos_dir):
    import functools
    import socket
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        closed_port = probe_socket.getsockname()[1]  # nothing listens once the socket is closed
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(photos_dir))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        reasons = {}
        for uri in (f"http://127.0.0.1:{closed_port}/truck.jpg", f"{base}/nowhere.jpg", f"{base}/truck.jpg"):
            try:
                reasons[uri] = probe(InputEntry(uri=uri, input_id="x"), IngestConfig(), StorageConfig())["width"]
            except Reject as reject:
                reasons[uri] = reject.reason
    finally:
        server.shutdown()
        server.server_close()
    assert list(reasons.values()) == ["unreadable", "missing", 1800]
