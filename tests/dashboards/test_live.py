"""The live dashboard over HTTP: the report's numbers, gallery pages made on demand, bound parameters, the CLI."""

import io
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections import defaultdict
from urllib.parse import quote, unquote

import boto3
import numpy as np
import pytest
from PIL import Image

from sam3_engine.engine.catalog import named_query
from sam3_engine.engine.config import StorageConfig
from tests.dashboards.conftest import HOSTILE, serving
from tests.helpers import rewrite, rows, table_cells


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _gallery(run_dir, concept_id, offset, page_size):
    params = {"concept_id": concept_id, "offset": offset, "page_size": page_size, "pair_id": None, "verifier": None}
    return rows(run_dir, named_query("gallery_page"), params)


def test_the_overview_shows_the_runs_coverage_and_links_each_concept_to_its_gallery(quickstart):
    run_dir, _ = quickstart
    coverage = {row["concept_id"]: row for row in rows(run_dir, named_query("concept_coverage"), {"verifier": None})}
    with serving(run_dir) as base:
        status, headers, body = _get(base + "/")
        page = body.decode()
        assert status == 200 and "default-src 'none'" in headers["content-security-policy"]
        shown = table_cells(page, "coverage").rows
        assert len(shown) == len(coverage) > 0
        linked = [unquote(concept) for concept in re.findall(r'<td data-column="phrase"><a href="/gallery/([^"]+)">', page)]
        assert sorted(linked) == sorted(coverage)  # every concept links to its own gallery
        for concept_id, row in zip(linked, shown, strict=True):
            assert row["phrase"] == coverage[concept_id]["phrase"] and int(row["pairs"]) == coverage[concept_id]["pairs"]
        assert table_cells(page, "coverage").script_sources == ["/assets/plotly.min.js"]  # served once, not inlined in every page
        status, headers, script = _get(base + "/assets/plotly.min.js")
        assert status == 200 and b"plotly" in script[:2000].lower() and "max-age" in headers["cache-control"]


def test_a_gallery_page_shows_the_pages_pairs_drawn_and_pages_through_the_rest(quickstart):
    run_dir, _ = quickstart
    (top,) = rows(run_dir, "SELECT concept_id, count(*) AS n FROM pairs WHERE instance_count > 0 GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1")
    assert top["n"] >= 2, "the quickstart should have a concept with masks on two images"
    with serving(run_dir, page_size=1) as base:
        seen = []
        for page in range(top["n"]):
            status, _, body = _get(f"{base}/gallery/{top['concept_id']}?page={page}")
            assert status == 200
            expected = _gallery(run_dir, top["concept_id"], page, 1)
            by_pair = defaultdict(list)
            for row in expected:
                by_pair[row["pair_id"]].append(row)
            tiles = re.findall(r'<img src="(/tile/[^"]+)"', body.decode())
            groups = sum(any(r["verdict"] == "accept" for r in rs) + any(r["verdict"] != "accept" for r in rs) for rs in by_pair.values())
            assert len(tiles) == groups > 0  # a picture of the accepted masks, one of the others, for the page's pair
            seen += list(by_pair)
            for tile in tiles:
                status, headers, picture = _get(base + tile.replace("&amp;", "&"))
                image = Image.open(io.BytesIO(picture))
                assert status == 200 and headers["content-type"] == "image/jpeg" and max(image.size) == 256
            assert ("next" in body.decode()) == (page + 1 < top["n"])
        assert len(set(seen)) == top["n"]  # every pair with masks once, over the pages
        status, _, body = _get(f"{base}/gallery/{top['concept_id']}?page={top['n']}")
        assert status == 404 and f"no pair of this concept has masks in the run on page {top['n'] + 1}" in body.decode()


def test_values_from_the_url_are_bound_and_validated(quickstart):
    run_dir, _ = quickstart
    (pair,) = rows(run_dir, "SELECT concept_id, pair_id FROM pairs WHERE instance_count > 0 ORDER BY pair_id LIMIT 1")
    with serving(run_dir) as base:
        for concept in ("nope", "x' OR '1'='1", "x') UNION SELECT * FROM images --", "\x00"):
            status, _, body = _get(f"{base}/gallery/{quote(concept, safe='')}")
            assert status == 404 and b"no pair of this concept" in body
        assert _get(f"{base}/gallery/{pair['concept_id']}?page=-1")[0] == 422
        assert _get(f"{base}/tile/{pair['concept_id']}/{pair['pair_id']}.jpg?masks=all")[0] == 422
        assert _get(f"{base}/tile/{pair['concept_id']}/{pair['pair_id']}.jpg?masks=others&side=100000")[0] == 422
        assert _get(f"{base}/tile/other/{pair['pair_id']}.jpg?masks=others")[0] == 404  # a pair of another concept is not shown
        big = _get(f"{base}/tile/{pair['concept_id']}/{pair['pair_id']}.jpg?masks=others&side=1024")
        assert big[0] == 200 and max(Image.open(io.BytesIO(big[2])).size) > 256  # the full-size view (capped by the photo's size)


def test_hostile_phrases_are_escaped_in_overview_and_gallery(hostile_run):
    run_dir, renamed = hostile_run
    with serving(run_dir) as base:
        overview = _get(base + "/")[2].decode()
        for concept_id, phrase in renamed.items():
            assert phrase not in overview
            assert phrase in [row["phrase"] for row in table_cells(overview, "coverage").rows]
            gallery = _get(f"{base}/gallery/{concept_id}")[2].decode()
            assert phrase not in gallery and phrase.replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;") in gallery
        assert not set(HOSTILE) - set(renamed.values())


def _grey_share(image: Image.Image) -> float:
    """Share of the pixels within a few levels of the placeholder's grey (238)."""
    values = np.asarray(image, dtype=np.int16)
    return float((np.abs(values - 238) <= 6).mean())


def test_a_gone_image_shows_a_placeholder_and_the_page_still_serves(quickstart, tmp_path):
    run_dir, _ = quickstart
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    sql = "SELECT concept_id, pair_id, image_id, uri FROM pairs JOIN images USING (image_id) WHERE instance_count > 0 LIMIT 1"
    (pair,) = rows(copy, sql)
    photo = tmp_path / "photo.jpg"
    shutil.copyfile(pair["uri"], photo)
    rewrite(copy, "images", "uri", "image_id", {pair["image_id"]: str(photo)})
    with serving(copy) as base:
        url = f"{base}/tile/{pair['concept_id']}/{pair['pair_id']}.jpg?masks=others"
        drawn = Image.open(io.BytesIO(_get(url)[2])).convert("L")
        photo.unlink()
        status, _, body = _get(url)
        gone = Image.open(io.BytesIO(body)).convert("L")
        assert status == 200 and _grey_share(gone) > 0.9 > _grey_share(drawn)  # the flat grey placeholder, not the photo
        assert _get(f"{base}/gallery/{pair['concept_id']}")[0] == 200


def test_the_overview_follows_the_run_as_tables_get_commits(quickstart, tmp_path):
    run_dir, _ = quickstart
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (concept,) = rows(copy, "SELECT concept_id FROM candidates ORDER BY concept_id LIMIT 1")
    with serving(copy) as base:
        before = _get(base + "/")[2].decode()
        assert _get(base + "/")[2].decode() == before  # no new commit: the same page, not computed again
        rewrite(copy, "candidates", "phrase", "concept_id", {concept["concept_id"]: "renamed while served"})
        after = _get(base + "/")[2].decode()
    assert "renamed while served" not in before
    assert "renamed while served" in [row["phrase"] for row in table_cells(after, "coverage").rows]


def test_the_cli_serves_on_127_0_0_1_and_says_where(quickstart):
    run_dir, _ = quickstart
    command = [sys.executable, "-m", "sam3_engine", "dashboard", str(run_dir), "--port", "0"]
    # As a terminal's foreground job: SIGINT at its default (a shell's background job, like this test's when the suite is
    # started with `&`, inherits it ignored, and the server then stops on Ctrl-C with 0).
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = process.stderr.readline()
        address = re.search(r"at http://127\.0\.0\.1:(\d+)/", line)
        assert address, line
        status, _, body = _get(f"http://127.0.0.1:{address.group(1)}/")
        assert status == 200 and b'id="coverage"' in body
        taken = subprocess.run([*command[:-1], address.group(1)], capture_output=True, text=True)
        assert taken.returncode == 2 and taken.stderr.strip().startswith("error: cannot listen on 127.0.0.1:")
        assert len(taken.stderr.strip().splitlines()) == 1 and "Traceback" not in taken.stderr
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
        rest = process.communicate(timeout=60)[1]
    assert process.returncode == 128 + signal.SIGINT and "Traceback" not in rest  # stopped as a shell expects, quietly


@pytest.mark.parametrize("args", [["--port", "70000"], ["--page-size", "0"]])
def test_the_cli_refuses_bad_options_in_a_line(quickstart, args):
    run_dir, _ = quickstart
    done = subprocess.run([sys.executable, "-m", "sam3_engine", "dashboard", str(run_dir), *args], capture_output=True, text=True)
    assert done.returncode == 2 and "Invalid value" in done.stderr


def test_a_damaged_run_an_unknown_verifier_and_an_empty_host_are_one_line_errors(quickstart, tmp_path):
    run_dir, _ = quickstart
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    for part in (damaged / "tables" / "images").glob("*.parquet"):
        part.unlink()  # a half-copied run: the commit log names files that are gone

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "sam3_engine", *args], capture_output=True, text=True, timeout=120)

    for done in (
        cli("report", str(damaged), "--out", str(tmp_path / "r.html")),
        cli("dashboard", str(damaged), "--port", "0"),
        cli("query", str(damaged), "SELECT 1"),
    ):
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().startswith(f"error: cannot read table images of {damaged}: IOException: "), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()
    verifiers = ", ".join(r["verifier"] for r in rows(run_dir, "SELECT DISTINCT verifier FROM pair_verifications ORDER BY 1"))
    assert verifiers
    for command in (["report", str(run_dir), "--out", str(tmp_path / "r.html")], ["dashboard", str(run_dir), "--port", "0"]):
        done = cli(*command, "--verifier", "nosuch")
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == f"error: {run_dir} has no verifier 'nosuch'; its verifiers: {verifiers}"
    done = cli("dashboard", str(run_dir), "--host", "", "--port", "0")
    assert done.returncode == 2 and done.stderr.startswith("error: --host is empty"), done.stderr


def test_the_dashboard_of_a_run_on_s3_draws_its_photos_from_s3(quickstart, s3_server, tmp_path):
    run_dir, _ = quickstart
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="dashboard")
    images = rows(copy, "SELECT image_id, uri FROM images")
    for image in images:
        client.upload_file(image["uri"], "dashboard", f"photos/{image['image_id']}.jpg")
    rewrite(copy, "images", "uri", "image_id", {image["image_id"]: f"s3://dashboard/photos/{image['image_id']}.jpg" for image in images})
    for path in copy.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "dashboard", f"runs/quickstart/{path.relative_to(copy)}")
    shutil.rmtree(copy)  # nothing local is left to read
    (top,) = rows(run_dir, "SELECT concept_id, count(*) AS n FROM pairs WHERE instance_count > 0 GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1")
    with serving("s3://dashboard/runs/quickstart", storage_config=StorageConfig(endpoint_url=s3_server)) as base:
        overview = _get(base + "/")[2].decode()
        assert len(table_cells(overview, "coverage").rows) == len(rows(run_dir, "SELECT DISTINCT concept_id FROM candidates"))
        status, _, page = _get(f"{base}/gallery/{top['concept_id']}")
        tiles = re.findall(r'<img src="(/tile/[^"]+)"', page.decode())
        assert status == 200 and tiles
        for tile in tiles:
            status, _, picture = _get(base + tile.replace("&amp;", "&"))
            assert status == 200 and _grey_share(Image.open(io.BytesIO(picture)).convert("L")) < 0.9  # the photo, not a placeholder
