"""The coverage report: the run's own numbers, in one offline HTML file, with untrusted text escaped."""

import io
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
from PIL import Image
from pycocotools import mask as mask_utils

from sam3_engine.app.pipeline import run_pipeline
from sam3_engine.dashboards.gallery import build_tiles, draw_masks, jpeg, render_gallery
from sam3_engine.dashboards.report import COVERAGE_COLUMNS, ReportData, gather, render
from sam3_engine.engine.catalog import connect, named_query
from sam3_engine.engine.config import load_config
from sam3_engine.engine.store import TableStore
from sam3_engine.schemas.tables import CANDIDATES, CONCEPTS, SPLITS
from tests.helpers import ingest, rows, table_cells


def test_the_report_of_the_quickstart_shows_the_runs_numbers_offline(quickstart, tmp_path):
    run_dir, _ = quickstart
    out = tmp_path / "report.html"
    done = subprocess.run([sys.executable, "-m", "sam3_engine", "report", str(run_dir), "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    parsed = table_cells(page, "coverage")
    assert parsed.script_sources == []  # Plotly is inlined: nothing to fetch
    assert 'id="long-tail"' in page and 'id="presence"' in page and "Not yet in this run" not in page
    coverage = named_query("concept_coverage").replace("$verifier", "NULL")
    expected = rows(run_dir, f"SELECT phrase, pairs, masks, rejected_masks, silver_negatives FROM ({coverage}) ORDER BY phrase")
    shown = sorted(
        ({k: row[k] for k in ("phrase", "pairs", "masks", "rejected_masks", "silver_negatives")} for row in parsed.rows),
        key=lambda row: row["phrase"],
    )
    assert len(shown) == len(expected) > 10
    assert shown == [{k: str(v) for k, v in row.items()} for row in expected]
    assert f"{len(expected)} concepts" in done.stderr
    (none,) = rows(run_dir, f"SELECT count(*) FILTER (verified_positives = 0) AS n FROM ({coverage})")
    assert 0 < none["n"] and f"{none['n']} of {len(expected)} concepts have none, below the log scale" in page
    verifiers = [r["verifier"] for r in rows(run_dir, "SELECT DISTINCT verifier FROM pair_verifications ORDER BY 1")]
    assert len(verifiers) == 2  # the quickstart's CLIP and VLM: every pair has two verdicts, and the page says so
    names = " and ".join(f"<code>{name}</code>" for name in verifiers)
    assert f'<p id="verifiers">Verdicts of {names}: each pair and mask has a verdict from each of the 2 verifiers' in page
    units = rows(run_dir, "SELECT stage, count(*) AS units, sum(num_inputs) AS inputs FROM units GROUP BY stage ORDER BY stage")
    health = sorted(
        ({k: row[k] for k in ("stage", "units", "inputs")} for row in table_cells(page, "run-health").rows), key=lambda r: r["stage"]
    )
    assert health == [{k: str(v) for k, v in row.items()} for row in units] and len(units) >= 8
    (kept,) = rows(
        run_dir, "SELECT count(*) FILTER (tier <> 'excluded') AS n, count(*) FILTER (kind = 'negative') AS negatives FROM splits"
    )
    assert f'<p id="negatives">{kept["n"]} pairs kept (Gold and Silver): {kept["negatives"] / kept["n"]:.1%} negatives' in page
    reasons = {(row["verdict"], row["reason"]): row["masks"] for row in table_cells(page, "mask-reasons").rows}
    counted = rows(
        run_dir,
        "SELECT verdict, r AS reason, count(*) AS n FROM (SELECT verdict, unnest(reasons) AS r FROM mask_verifications) GROUP BY ALL",
    )
    assert {(row["verdict"], row["reason"]): str(row["n"]) for row in counted}.items() <= reasons.items() and counted
    fired = rows(
        run_dir, "SELECT count(*) AS n FROM pairs JOIN candidates USING (pair_id) WHERE origin = 'hard_negative' AND instance_count > 0"
    )
    assert len(table_cells(page, "fired").rows) == min(fired[0]["n"], 100) and f"Hard negatives SAM 3 fired on ({fired[0]['n']})" in page
    for figure in ("concepts-per-image", "instances-per-pair", "mask-area-log10", "presence-histogram"):
        assert f'id="{figure}"' in page, figure


def test_every_figure_is_a_packaged_query_the_query_command_runs(quickstart):
    run_dir, _ = quickstart
    command = [sys.executable, "-m", "sam3_engine", "query", str(run_dir), "@concept_coverage", "-p", "verifier=null", "-f", "json"]
    queried = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    gathered = gather(str(run_dir)).coverage
    assert [(r["phrase"], r["pairs"], r["verified_positives"]) for r in queried] == [
        (r["phrase"], r["pairs"], r["verified_positives"]) for r in gathered
    ]
    missing = subprocess.run([sys.executable, "-m", "sam3_engine", "query", str(run_dir), "@no_such_query"], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no packaged query" in missing.stderr


def test_untrusted_phrases_are_text_in_tables_and_plots():
    hostile = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "a & b"]
    numbers = {key: 1 for key, _ in COVERAGE_COLUMNS if key not in ("phrase", "parent")}
    coverage = [{**numbers, "phrase": phrase, "parent": phrase, "verified_positives": 1, "pairs": 1} for phrase in hostile]
    data = ReportData("run<script>", coverage, [{"stage": "<b>ingest</b>", "reason": hostile[1], "rejects": 2}], {})
    agreement = {f"{kind}_{measure}": None for kind in ("present", "absent", "accept") for measure in ("precision", "recall")}
    data.loop_rounds = [{"selection": "round-1", "answered": 1, "pending": 0, "gold_pairs": 1, "selected": 1, **agreement}]
    data.loop_gold = [{"selection": "round-1", "phrase": phrase, "gold_positives": 1, "gold_negatives": 0} for phrase in hostile]
    page = render(data)
    for text in hostile[:2]:
        assert text not in page
    assert "<b>ingest</b>" not in page and "run<script>" not in page
    parsed = table_cells(page, "coverage")
    assert [row["phrase"] for row in parsed.rows] == hostile  # shown as the text it is
    assert [row["reason"] for row in table_cells(page, "rejects").rows] == [hostile[1]]
    assert [row["phrase"] for row in table_cells(page, "loop-gold").rows] == hostile


def test_a_run_with_stages_still_to_run_says_what_is_missing(photos_dir, tmp_path):
    ingest(photos_dir, tmp_path / "run")
    data = gather(str(tmp_path / "run"))
    assert data.coverage == [] and data.rejects == []
    assert data.missing == {
        "candidates": "mine",
        "pairs": "propose",
        "pair_verifications": "verify",
        "mask_verifications": "verify",
        "splits": "splits",
    }
    page = render(data)
    assert "Not yet in this run" in page and "run the <code>mine</code> stage" in page
    assert 'id="long-tail"' not in page and table_cells(page, "coverage").rows == []


def test_stages_that_ran_on_nothing_are_not_reported_as_not_run(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    run_pipeline(load_config(None, {"input": str(empty), "output": str(tmp_path / "run"), "stages": "ingest,mine,dedup"}))
    data = gather(str(tmp_path / "run"))
    assert data.missing == {"pairs": "propose", "pair_verifications": "verify", "mask_verifications": "verify", "splits": "splits"}
    page = render(data)
    assert "The dedup stage has hashed no image yet." in page and "has not run" not in page


def _constructed_ontology_run(run_dir, positives=None):
    """A six-concept ontology (animal > dog > poodle, animal > cat, vehicle > car) with known verified positives."""
    parents = {"animal": None, "dog": "animal", "cat": "animal", "poodle": "dog", "vehicle": None, "car": "vehicle"}
    positives = positives or {"dog": 3, "poodle": 1, "car": 2}  # cat: none; Silver counts, an excluded pair does not
    concepts = [
        {"concept_id": f"c-{p}", "phrase": p, "spellings": [], "parent": parent, "synonyms": [], "sources": ["lvis"], "unit_id": "u"}
        for p, parent in parents.items()
    ]
    concepts.append({**concepts[0], "concept_id": "c-mined", "phrase": "mined only", "parent": None, "sources": ["caption"]})
    splits, candidates = [], []
    for phrase in ("dog", "cat", "poodle", "car"):
        for image in range(4):
            pair = {"pair_id": f"{phrase}-{image}", "image_id": f"img-{image}", "concept_id": f"c-{phrase}", "phrase": phrase}
            candidates.append(
                {
                    **pair,
                    "origin": "caption",
                    "raw_phrase": phrase,
                    "score": 1.0,
                    "related_concept_id": None,
                    "relation": None,
                    "unit_id": "u",
                }
            )
            positive = image < positives.get(phrase, 0)
            splits.append(
                {
                    **pair,
                    "split": "train",
                    "tier": ("gold" if image % 2 else "silver") if positive else "excluded",
                    "kind": "positive" if positive else None,
                    "reason": "constructed",
                    "sources": [],
                    "hard_negative": False,
                    "unit_id": "u",
                }
            )
    store = TableStore(str(run_dir))
    for spec, table in ((CONCEPTS, concepts), (SPLITS, splits), (CANDIDATES, candidates)):
        store.replace(spec, "u", pa.Table.from_pylist(table, schema=spec.schema))


def test_ontology_coverage_rolls_positives_up_the_parent_chain(tmp_path):
    _constructed_ontology_run(tmp_path / "run")
    data = gather(str(tmp_path / "run"), min_positives=2)
    assert data.ontology == {"concepts": 6, "asked": 4, "covered": 2}  # dog and car; the mined-only concept is not the ontology's
    branches = {row["branch"]: (row["concepts"], row["covered"], row["covered_share"], row["verified_positives"]) for row in data.branches}
    assert branches == {"animal": (4, 1, 0.25, 4), "dog": (2, 1, 0.5, 4), "vehicle": (2, 1, 0.5, 2)}
    assert [row["branch"] for row in data.branches][0] == "animal"  # thinnest first
    assert [(row["phrase"], row["verified_positives"]) for row in data.thin] == [("poodle", 1), ("cat", 0)]
    page = render(data)
    assert "2 of 6 concepts of the ontology reach 2 verified positive pairs; the run asked about 4 of them" in page
    assert [row["branch"] for row in table_cells(page, "branches").rows] == ["animal", "dog", "vehicle"]


def test_run_against_run_shows_the_concepts_that_gained_or_lost_positives(tmp_path):
    _constructed_ontology_run(tmp_path / "before", {"dog": 1, "poodle": 1, "cat": 2})
    _constructed_ontology_run(tmp_path / "after")  # dog 3, poodle 1, car 2, cat 0
    out = tmp_path / "report.html"
    command = [
        sys.executable,
        "-m",
        "sam3_engine",
        "report",
        str(tmp_path / "after"),
        "-o",
        str(out),
        "--compare",
        str(tmp_path / "before"),
    ]
    for run_dir in ("before", "after"):  # the CLI reads run directories only
        (tmp_path / run_dir / "run.json").write_text("{}")
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    assert "Verified positives 4 before, 6 now: 2 concepts gained, 1 lost." in page
    changes = {
        row["phrase"]: (row["positives_before"], row["positives_after"], row["positives_change"])
        for row in table_cells(page, "coverage-change").rows
    }
    assert changes == {"dog": ("1", "3", "2"), "car": ("0", "2", "2"), "cat": ("2", "0", "-2")}


def test_the_gallery_draws_a_bounded_stable_sample_and_a_placeholder_for_a_gone_image(quickstart, tmp_path):
    run_dir, _ = quickstart
    first = gather(str(run_dir), gallery_per_concept=2)
    again = gather(str(run_dir), gallery_per_concept=2)
    assert first.gallery == again.gallery and 'id="gallery"' in first.gallery  # the same sample, drawn the same
    per_concept = rows(run_dir, "SELECT concept_id, least(count(*), 2) AS n FROM pairs WHERE instance_count > 0 GROUP BY concept_id")
    pictures = first.gallery.count('<img src="data:image/jpeg;base64,')
    assert sum(r["n"] for r in per_concept) <= pictures <= 2 * sum(r["n"] for r in per_concept)  # a tile or two per sampled pair
    assert "image missing" not in first.gallery
    row = {
        "phrase": "<b>dog</b>",
        "pair_id": "p",
        "image_id": "i",
        "uri": str(tmp_path / "gone.jpg"),
        "mask_id": "m",
        "height": 4,
        "width": 4,
        "rle_counts": "016",
        "score": 0.5,
        "verdict": "accept",
        "reasons": [],
    }
    (tile,) = build_tiles([row])
    assert tile.thumbnail is None
    page = render_gallery([tile])
    assert "image missing" in page and "<b>dog</b>" not in page and "&lt;b&gt;dog&lt;/b&gt;" in page


def test_draw_masks_colours_the_mask_and_leaves_the_rest():
    image = Image.new("RGB", (40, 30), (10, 10, 10))
    mask = np.zeros((30, 40), np.uint8, order="F")
    mask[5:25, 10:30] = 1
    counts = mask_utils.encode(mask)["counts"].decode("ascii")
    drawn = np.asarray(draw_masks(image, [{"height": 30, "width": 40, "rle_counts": counts}]))
    assert (drawn[0, 0] == (10, 10, 10)).all()  # outside the mask: untouched
    assert (drawn[15, 20] != (10, 10, 10)).any() and (drawn[5, 20] != drawn[15, 20]).any()  # filled inside, outlined at the edge


def test_tiny_and_thin_images_make_pictures_a_person_can_see():
    def size(image, side):
        return Image.open(io.BytesIO(jpeg(image, side))).size

    assert size(Image.new("RGB", (1, 1), (200, 0, 0)), 256) == (64, 64)  # enlarged whole pixels, not a dot
    assert size(Image.new("RGB", (10000, 10), (0, 200, 0)), 256) == (256, 8)  # padded to an eighth of 64, not a line
    assert size(Image.new("RGB", (800, 600)), 256) == (256, 192)  # a photo: scaled to fit, as before
    assert size(Image.new("RGB", (300, 200)), 1024) == (300, 200)  # never enlarged past its own size when large enough
    picture = np.asarray(Image.open(io.BytesIO(jpeg(Image.new("RGB", (1, 1), (200, 0, 0)), 256))))
    assert abs(int(picture[32, 32, 0]) - 200) < 8 and picture[32, 32, 1] < 8  # the pixel's own colour, filling the picture


def test_duckdb_never_draws_its_progress_bar_into_the_output(tmp_path):
    """DuckDB draws a progress bar on stdout for a long query: in `query -f csv` or a report build it would corrupt the output."""
    con = connect(str(tmp_path / "run"))
    try:
        assert con.sql("SELECT current_setting('enable_progress_bar')").fetchall() == [(False,)]
    finally:
        con.close()
