"""Selecting pairs for review: what is excluded, whole images, each strategy's order, and bad input."""

import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from sam3_engine.engine.catalog import named_query
from sam3_engine.engine.config import MaskThresholds, PairThresholds
from sam3_engine.engine.store import TableStore
from sam3_engine.labeling.select import SelectionError, parse_strategies, select
from sam3_engine.schemas.tables import IMAGE_EMBEDDINGS
from tests.helpers import rows


@pytest.fixture()
def run(quickstart, tmp_path):
    """A copy of the quickstart: selecting writes to the run."""
    copy = tmp_path / "run"
    shutil.copytree(quickstart[0], copy)
    return copy


def _candidates(run, selection="x"):
    params = {
        "selection": selection,
        "human_verifiers": ["human"],
        "present_threshold": PairThresholds().present_threshold,
        "absent_threshold": PairThresholds().absent_threshold,
        "presence_margin": 0.2,
        "min_stability": MaskThresholds().min_stability,
        "min_reprompt_iou": MaskThresholds().min_reprompt_iou,
        "min_positives": 10,
        "seed": "0",
    }
    return {row["pair_id"]: row for row in rows(run, named_query("selection_candidates"), params)}


def test_whole_images_in_rank_order_within_budget_and_cap(run):
    chosen = select(TableStore(str(run)), "round-1", 7, parse_strategies(None), max_pairs_per_image=3)
    picked = rows(run, "SELECT * FROM selections WHERE selection = 'round-1' ORDER BY rank")
    assert [row["rank"] for row in picked] == list(range(1, 8)) and chosen.rows.num_rows == 7
    images = [row["image_id"] for row in picked]
    assert all(images.count(image) <= 3 for image in images)
    runs = [image for index, image in enumerate(images) if index == 0 or images[index - 1] != image]
    assert len(runs) == len(set(runs))  # an image's pairs are consecutive: they go out together
    pairs = {row["pair_id"]: row for row in rows(run, "SELECT pair_id, image_id, phrase FROM pairs")}
    assert all(pairs[row["pair_id"]]["image_id"] == row["image_id"] and pairs[row["pair_id"]]["phrase"] == row["phrase"] for row in picked)


def test_uncertainty_takes_the_most_doubtful_pair_first_and_scores_match_the_sql(run):
    candidates = _candidates(run)
    select(TableStore(str(run)), "round-1", 5, parse_strategies(["uncertainty"]), max_pairs_per_image=5)
    picked = rows(run, "SELECT pair_id, score, strategy FROM selections ORDER BY rank")
    assert picked[0]["score"] == max(row["uncertainty"] for row in candidates.values())
    assert all(row["score"] == pytest.approx(candidates[row["pair_id"]]["uncertainty"]) for row in picked)
    assert {row["strategy"] for row in picked} == {"uncertainty"}
    scores = [row["score"] for row in picked]
    assert scores == sorted(scores, reverse=True)  # one image here: its pairs best first


def test_a_later_selection_skips_pairs_out_for_review_and_pairs_people_labelled(run, tmp_path):
    store = TableStore(str(run))
    first = set(select(store, "round-1", 8, parse_strategies(None)).rows["pair_id"].to_pylist())
    labelled = sorted(set(_candidates(run)) - first)[:5]
    (tmp_path / "labels.csv").write_text("pair_id,present\n" + "".join(f"{pair},yes\n" for pair in labelled))
    command = [sys.executable, "-m", "sam3_engine", "import-labels", str(run), "--labels", str(tmp_path / "labels.csv")]
    subprocess.run(command, check=True, capture_output=True)
    second = select(store, "round-2", 1000, parse_strategies(None), max_pairs_per_image=1000)
    picked = set(second.rows["pair_id"].to_pylist())
    assert picked and not picked & first and not picked & set(labelled)
    assert len(picked) == second.candidates == 40 - len(first) - len(labelled)
    again = select(store, "round-1", 8, parse_strategies(None))  # the same round again: replaced, not doubled
    assert set(again.rows["pair_id"].to_pylist()) == first
    counts = rows(run, "SELECT selection, count(*) AS n FROM selections GROUP BY 1 ORDER BY 1")
    assert counts == [{"selection": "round-1", "n": 8}, {"selection": "round-2", "n": len(picked)}]


def test_coverage_prefers_thin_concepts_and_random_follows_its_seed(run):
    candidates = _candidates(run)
    chosen = select(TableStore(str(run)), "thin", 6, parse_strategies(["coverage"]))
    assert all(candidates[p]["coverage"] == max(c["coverage"] for c in candidates.values()) for p in chosen.rows["pair_id"].to_pylist())
    one = select(TableStore(str(run)), "r", 6, parse_strategies(["random"]), max_pairs_per_image=2, seed=1).rows["pair_id"].to_pylist()
    same = select(TableStore(str(run)), "r", 6, parse_strategies(["random"]), max_pairs_per_image=2, seed=1).rows["pair_id"].to_pylist()
    other = select(TableStore(str(run)), "r", 6, parse_strategies(["random"]), max_pairs_per_image=2, seed=2).rows["pair_id"].to_pylist()
    assert one == same != other


def test_diversity_does_not_spend_the_budget_on_a_near_duplicate(run):
    images = [row["image_id"] for row in rows(run, "SELECT image_id FROM images ORDER BY image_id")]
    assert len(images) == 3
    vectors = {images[0]: [1.0, 0.0], images[1]: [0.999, 0.0447], images[2]: [0.0, 1.0]}  # 0 and 1: near-duplicates
    table = pa.table(
        {
            "image_id": images,
            "model": ["test"] * 3,
            "embedding": pa.array([vectors[i] for i in images], pa.list_(pa.float32())),
            "unit_id": ["u"] * 3,
        }
    )
    TableStore(str(run)).overwrite(IMAGE_EMBEDDINGS, pa.RecordBatchReader.from_batches(table.schema, table.to_batches()))
    chosen = select(TableStore(str(run)), "spread", 2, {"diversity": 1.0}, max_pairs_per_image=1)
    picked = chosen.rows["image_id"].to_pylist()
    assert len(picked) == 2 and images[2] in picked and not {images[0], images[1]} <= set(picked)
    assert np.dot(vectors[images[0]], vectors[images[1]]) > 0.99  # the duplicates really are near each other


def test_bad_strategies_and_missing_embeddings_are_one_line_errors(run):
    for specs, message in (
        (["bogus"], "unknown strategy 'bogus'"),
        (["uncertainty=x"], "is not a number"),
        (["uncertainty=-1"], "finite number >= 0"),
        (["uncertainty=0"], "nothing to choose by"),
    ):
        with pytest.raises(SelectionError, match=message):
            parse_strategies(specs)
    shutil.rmtree(run / "tables" / "image_embeddings")
    with pytest.raises(SelectionError, match="run the embed stage"):
        select(TableStore(str(run)), "x", 4, {"diversity": 1.0})
    for args in (["-s", "bogus"], ["--name", "a b'; DROP"], ["--name", "x" * 65], ["-s", "diversity"]):
        done = subprocess.run([sys.executable, "-m", "sam3_engine", "select", str(run), "-n", "4", *args], capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert rows(run, "SELECT count(*) AS n FROM selections") == [{"n": 0}]  # nothing half-written


def test_nothing_left_to_select_says_so_in_a_line(run):
    def cli(name):
        command = [sys.executable, "-m", "sam3_engine", "select", str(run), "-n", "100000", "--max-pairs-per-image", "100000"]
        return subprocess.run([*command, "--name", name], capture_output=True, text=True)

    everything = cli("everything")
    assert everything.returncode == 0 and rows(run, "SELECT count(*) AS n FROM selections")[0]["n"] > 0, everything.stderr
    nothing = cli("nothing-left")
    assert nothing.returncode == 0 and nothing.stderr.startswith("selection nothing-left: nothing to select, so nothing stored: ")
    assert rows(run, "SELECT count(*) AS n FROM selections WHERE selection = 'nothing-left'") == [{"n": 0}]
