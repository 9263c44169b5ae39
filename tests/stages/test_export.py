"""Export round trips (SA-Co, COCO, Parquet) through pycocotools, and the run evaluated against its own split."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from sam3_engine.app.export import ExportError, export, predictions
from sam3_engine.app.pipeline import run_pipeline
from sam3_engine.engine.config import load_config
from sam3_engine.engine.store import TableStore
from sam3_engine.metrics.cgf1 import evaluate
from sam3_engine.schemas.tables import MASK_VERIFICATIONS, MASKS, PAIR_VERIFICATIONS, PAIRS
from sam3_engine.text.concepts import concept_id, pair_id
from tests.helpers import ingest, rows

UNIT = "constructed"
BOXES = {
    "car-a": ("car", (100, 100, 200, 300), 0.9),
    "car-b": ("car", (500, 900, 150, 150), 0.8),
    "dog-c": ("dog", (700, 200, 100, 120), 0.9),
    "dog-d": ("dog", (50, 1500, 60, 60), 0.7),
}
VOTES = {
    "car": {"v1": "positive", "v2": "positive"},
    "dog": {"v1": "positive", "v2": "unsure"},
    "giraffe": {"v1": "negative", "v2": "negative"},
    "bus": {"v1": "unsure", "v2": "unsure"},
}
ACCEPTED = {"v1": {"car-a", "car-b", "dog-c"}, "v2": {"car-a", "car-b"}}


def _mask(shape, top, left, height, width):
    mask = np.zeros(shape, np.uint8)
    mask[top : top + height, left : left + width] = 1
    return mask


@pytest.fixture(scope="module")
def split_run(photos_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("photo")
    (folder / "truck.jpg").write_bytes((photos_dir / "truck.jpg").read_bytes())
    run_dir = tmp_path_factory.mktemp("run") / "run"
    ingest(folder, run_dir)
    (image,) = rows(run_dir, "SELECT image_id, width, height FROM images")
    shape = (image["height"], image["width"])
    pid = {phrase: pair_id(image["image_id"], concept_id(phrase)) for phrase in VOTES}
    pairs = [
        {
            "pair_id": pid[p],
            "image_id": image["image_id"],
            "concept_id": concept_id(p),
            "phrase": p,
            "presence_score": 0.9,
            "instance_count": 0,
            "max_score": 0.9,
            "height": shape[0],
            "width": shape[1],
            "foreground_counts": None,
            "foreground_area": None,
            "phrase_truncated": False,
            "model_id": "constructed",
            "model_revision": None,
            "random_weights": False,
            "run_id": "r",
            "unit_id": UNIT,
        }
        for p in VOTES
    ]
    masks, stored = [], {}
    for name, (phrase, box, score) in BOXES.items():
        encoded = mask_utils.encode(np.asfortranarray(_mask(shape, *box)))
        stored[name] = _mask(shape, *box)
        masks.append(
            {
                "mask_id": name,
                "pair_id": pid[phrase],
                "image_id": image["image_id"],
                "concept_id": concept_id(phrase),
                "query_index": 0,
                "height": shape[0],
                "width": shape[1],
                "rle_counts": encoded["counts"].decode(),
                "bbox": mask_utils.toBbox(encoded).tolist(),
                "area": int(mask_utils.area(encoded)),
                "model_box": [0, 0, 1, 1],
                "object_score": score,
                "presence_score": 0.9,
                "score": score,
                "stability_score": 1.0,
                "reprompt_iou": None,
                "unit_id": UNIT,
            }
        )
    store = TableStore(str(run_dir))
    store.replace(PAIRS, UNIT, pa.Table.from_pylist(pairs, schema=PAIRS.schema))
    store.replace(MASKS, UNIT, pa.Table.from_pylist(masks, schema=MASKS.schema))
    says = {"positive": ("present", "exhaustive"), "negative": ("absent", "exhaustive"), "unsure": ("uncertain", "unknown")}
    for verifier in ("v1", "v2"):
        verdicts = [
            {
                "mask_id": m["mask_id"],
                "pair_id": m["pair_id"],
                "image_id": m["image_id"],
                "concept_id": m["concept_id"],
                "score": m["score"],
                "verdict": "accept" if m["mask_id"] in ACCEPTED[verifier] else "reject",
                "reasons": [],
                "verifier": verifier,
                "verifier_version": "t",
                "thresholds": "{}",
            }
            for m in masks
        ]
        store.replace(MASK_VERIFICATIONS, verifier, pa.Table.from_pylist(verdicts, schema=MASK_VERIFICATIONS.schema))
        judged = []
        for phrase, votes in VOTES.items():
            presence, exhaustivity = says[votes[verifier]]
            accepted = sum(1 for n in ACCEPTED[verifier] if BOXES[n][0] == phrase)
            judged.append(
                {
                    "pair_id": pid[phrase],
                    "image_id": image["image_id"],
                    "concept_id": concept_id(phrase),
                    "phrase": phrase,
                    "presence_probability": 0.5,
                    "presence": presence,
                    "presence_reason": "signals_agree",
                    "accepted_masks": accepted if presence == "present" else 0,
                    "uncovered_fraction": 0.0,
                    "exhaustivity": exhaustivity,
                    "exhaustivity_reason": "covered",
                    "verifier": verifier,
                    "verifier_version": "t",
                    "thresholds": "{}",
                }
            )
        store.replace(PAIR_VERIFICATIONS, verifier, pa.Table.from_pylist(judged, schema=PAIR_VERIFICATIONS.schema))
    run_pipeline(load_config(None, {"output": str(run_dir), "stages": "splits", "splits.train_fraction": 1.0, "splits.val_fraction": 0.0}))
    return run_dir, stored, shape


def _export(run_dir, tmp_path, fmt, tier="all", name=None):
    out = str(tmp_path / (name or f"out.{fmt if fmt != 'saco' else 'json'}"))
    return export(TableStore(str(run_dir)), "train", tier, fmt, out, load_config(None, {}).storage)


def test_saco_export_round_trips_through_pycocotools(split_run, tmp_path):
    run_dir, stored, (height, width) = split_run
    report = _export(run_dir, tmp_path, "saco")
    assert [p.rsplit("/", 1)[1] for p in report.files] == ["out_a.json", "out_b.json"]  # car has two sources: one file per source
    assert (report.pairs, report.positives, report.negatives) == (3, 2, 1)
    for path in report.files:
        data = json.loads(open(path).read())
        by_phrase = {image["text_input"]: image for image in data["images"]}
        assert set(by_phrase) == {"car", "dog", "giraffe"} and all(
            i["is_instance_exhaustive"] == 1 for i in data["images"]
        )  # bus: unconfirmed, excluded
        kept = {a["mask_id"]: a for a in data["annotations"]}
        assert set(kept) == {"car-a", "car-b", "dog-c"}  # dog-d was rejected by dog's only source
        assert not [a for a in data["annotations"] if a["image_id"] == by_phrase["giraffe"]["id"]]  # a negative: a pair without annotations
        for name, annotation in kept.items():
            decoded = mask_utils.decode(
                {"size": annotation["segmentation"]["size"], "counts": annotation["segmentation"]["counts"].encode()}
            )
            assert np.array_equal(decoded, stored[name])
            x, y, w, h = annotation["bbox"]
            assert [x * width, y * height, w * width, h * height] == pytest.approx(
                mask_utils.toBbox(mask_utils.encode(np.asfortranarray(stored[name]))).tolist()
            )
            assert annotation["area"] == pytest.approx(stored[name].sum() / (width * height))
        coco = COCO(path)  # the file loads as COCO
        assert len(coco.getAnnIds()) == 3
    gold = _export(run_dir, tmp_path, "saco", tier="gold", name="gold.json")
    assert gold.pairs == 2 and gold.masks == 2 and len(gold.files) == 2
    silver = _export(run_dir, tmp_path, "saco", tier="silver", name="silver.json")
    assert (silver.pairs, silver.masks, len(silver.files)) == (1, 1, 1)


def test_coco_and_parquet_exports(split_run, tmp_path):
    run_dir, stored, _ = split_run
    report = _export(run_dir, tmp_path, "coco")
    coco = COCO(report.files[0])
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert sorted(names.values()) == ["car", "dog", "giraffe"]
    (photo,) = coco.loadImgs(coco.getImgIds())
    assert [names[c] for c in photo["neg_category_ids"]] == ["giraffe"]
    for annotation in coco.loadAnns(coco.getAnnIds()):
        assert np.array_equal(coco.annToMask(annotation), stored[annotation["mask_id"]])
        assert names[annotation["category_id"]] == BOXES[annotation["mask_id"]][0]
    parquet = _export(run_dir, tmp_path, "parquet")
    table = pq.read_table(parquet.files[0])
    by_phrase = {r["phrase"]: r for r in table.to_pylist()}
    assert {p: len(r["masks"]) for p, r in by_phrase.items()} == {"car": 2, "dog": 1, "giraffe": 0}
    for row in table.to_pylist():
        for mask in row["masks"]:
            decoded = mask_utils.decode({"size": [row["height"], row["width"]], "counts": mask["rle_counts"].encode()})
            assert np.array_equal(decoded, stored[mask["mask_id"]])


def test_bad_export_requests_are_clear_errors(split_run, tmp_path):
    run_dir, _, _ = split_run
    storage_config = load_config(None, {}).storage
    with pytest.raises(ExportError, match=r"^split 'test' has no gold pairs; splits with gold pairs: train \(2\)$"):
        export(TableStore(str(run_dir)), "test", "gold", "saco", str(tmp_path / "x.json"), storage_config)
    with pytest.raises(ExportError, match=r"^split 'val' has no pairs; splits with pairs: train \(3\)$"):
        export(TableStore(str(run_dir)), "val", "all", "saco", str(tmp_path / "x.json"), storage_config)
    with pytest.raises(ExportError, match="--format must be one of"):
        export(TableStore(str(run_dir)), "train", "all", "yolo", str(tmp_path / "x"), storage_config)


@pytest.mark.parametrize("fmt", ["saco", "coco", "parquet"])
def test_an_unwritable_out_is_a_one_line_error_naming_it(split_run, tmp_path, fmt):
    import os
    import re

    run_dir, _, _ = split_run
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "locked").mkdir(mode=0o500)
    outs = {
        "Is a directory": tmp_path,
        "Not a directory": tmp_path / "a-file" / "out.json",
        "No such file or directory": tmp_path / "no" / "out.json",
    }
    if os.geteuid() != 0:  # root writes anywhere
        outs["Permission denied"] = tmp_path / "locked" / "out.json"
    for reason, out in outs.items():
        named = str(out).replace("out.json", "out_a.json" if fmt == "saco" else "out.json")  # saco: one file per source, car has two
        with pytest.raises(ExportError, match=f"^cannot write --out {re.escape(named)}: {reason}$"):
            export(TableStore(str(run_dir)), "train", "all", fmt, str(out), load_config(None, {}).storage)
    command = [sys.executable, "-m", "sam3_engine", "export", str(run_dir), "--split", "train", "--format", fmt, "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == f"error: cannot write --out {tmp_path}: Is a directory"


def test_a_failed_write_leaves_no_half_export_and_the_source_files_are_checked_first(split_run, tmp_path):
    run_dir, _, _ = split_run
    storage_config = load_config(None, {}).storage
    for fmt in ("coco", "parquet"):  # the disk fills up while the file is written
        with pytest.raises(ExportError, match="^cannot write --out /dev/full: No space left on device$"):
            export(TableStore(str(run_dir)), "train", "all", fmt, "/dev/full", storage_config)
        assert Path("/dev/full").is_char_device()  # a device the export did not make is left alone
    (tmp_path / "out_b.json").mkdir()  # saco writes out_a.json and out_b.json (car has two sources)
    with pytest.raises(ExportError, match=r"cannot write .*out_b\.json, a file of --out .*out\.json \(one per source\): Is a directory"):
        export(TableStore(str(run_dir)), "train", "all", "saco", str(tmp_path / "out.json"), storage_config)
    assert sorted(os.listdir(tmp_path)) == ["out_b.json"]  # refused before out_a.json was written
    written = export(TableStore(str(run_dir)), "train", "all", "saco", str(tmp_path / "upper.JSON"), storage_config)
    assert [Path(f).name for f in written.files] == ["upper_a.JSON", "upper_b.JSON"]


def test_the_run_evaluated_against_its_own_split(split_run, tmp_path):
    run_dir, _, _ = split_run
    store = TableStore(str(run_dir))
    gold = [json.loads(open(p).read()) for p in _export(run_dir, tmp_path, "saco", tier="gold", name="g.json").files]
    perfect = evaluate(predictions(store, "train", "gold"), gold)
    # car: both proposals are the two accepted masks; giraffe: no proposal, a true negative
    f1 = 2 * (2 / (2 + 1e-4)) ** 2 / (2 * 2 / (2 + 1e-4) + 1e-4)
    assert perfect["pmF1"] == pytest.approx(100 * f1) and perfect["IL_MCC"] == pytest.approx(1 / (1 + 1e-6))
    done = subprocess.run(
        [sys.executable, "-m", "sam3_engine", "eval", str(run_dir), "--split", "train", "--tier", "all"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    everything = json.loads(done.stdout)
    # dog's rejected proposal (score 0.7) is a false positive against the split, which keeps only dog-c
    assert everything["pairs"] == 3 and everything["precision"] == pytest.approx(np.mean([3 / (4 + 1e-4)] * 10))
    assert math.isclose(everything["recall"], 3 / (3 + 1e-4))


def test_human_labels_become_a_verifier_that_makes_gold(split_run, tmp_path):
    import shutil

    from sam3_engine.app.labels import import_labels

    run_dir = tmp_path / "run"
    shutil.copytree(split_run[0], run_dir)
    (image,) = rows(run_dir, "SELECT image_id FROM images")
    pid = {p: pair_id(image["image_id"], concept_id(p)) for p in VOTES}
    labels = pa.table(
        {
            "pair_id": [pid["dog"], pid["bus"], None, None, "not-a-pair"],
            "present": ["yes", "no", None, None, "yes"],
            "mask_id": [None, None, "dog-c", "dog-d", None],
            "good": [None, None, True, False, None],
        }
    )
    counts = import_labels(TableStore(str(run_dir)), labels, "human")
    assert counts == {"pairs": 2, "masks": 2, "unmatched": 1}
    human = {r["phrase"]: r for r in rows(run_dir, "SELECT * FROM pair_verifications WHERE verifier = 'human'")}
    assert (human["dog"]["presence"], human["dog"]["accepted_masks"], human["dog"]["exhaustivity"]) == ("present", 1, "unknown")
    assert (human["bus"]["presence"], human["bus"]["exhaustivity"]) == ("absent", "exhaustive")
    run_pipeline(load_config(None, {"output": str(run_dir), "stages": "splits", "splits.train_fraction": 1.0, "splits.val_fraction": 0.0}))
    splits = {r["phrase"]: r for r in rows(run_dir, "SELECT * FROM splits")}
    assert (splits["bus"]["tier"], splits["bus"]["reason"], splits["bus"]["sources"]) == (
        "gold",
        "human_negative",
        ["human"],
    )  # was unconfirmed
    assert (
        splits["dog"]["tier"] == "silver"
    )  # exhaustivity unlabelled: the human confirms presence, not completeness; v1 still says positive
    exhaustive = pa.table(
        {
            "pair_id": [pid["dog"], None],
            "present": [True, None],
            "exhaustive": [True, None],
            "mask_id": [None, "dog-c"],
            "good": [None, True],
        }
    )
    import_labels(TableStore(str(run_dir)), exhaustive, "human")  # replaces the first import
    assert rows(run_dir, "SELECT count(*) AS n FROM pair_verifications WHERE verifier = 'human'") == [{"n": 1}]
    run_pipeline(load_config(None, {"output": str(run_dir), "stages": "splits", "splits.train_fraction": 1.0, "splits.val_fraction": 0.0}))
    dog = rows(run_dir, "SELECT tier, reason, sources FROM splits WHERE phrase = 'dog'")[0]
    assert dog == {"tier": "gold", "reason": "human_positive", "sources": ["human", "v1"]}
    gold = export(TableStore(str(run_dir)), "train", "gold", "saco", str(tmp_path / "g.json"), load_config(None, {}).storage)
    assert len(gold.files) == 2  # car (v1, v2) and dog (human, v1) have two sources each
    for path in gold.files:
        kept = {a["mask_id"] for a in json.loads(open(path).read())["annotations"]}
        assert "dog-c" in kept and "dog-d" not in kept
    with pytest.raises(ValueError, match="more than once"):
        import_labels(TableStore(str(run_dir)), pa.table({"mask_id": ["dog-c", "dog-c"], "good": [True, False]}), "human")


def test_a_label_csv_mixing_pair_and_mask_rows_reads_blank_cells_as_missing(split_run, tmp_path):
    import shutil

    from sam3_engine.app.calibration import calibrate
    from sam3_engine.app.labels import import_labels
    from sam3_engine.engine import storage

    run_dir = tmp_path / "run"
    shutil.copytree(split_run[0], run_dir)
    (image,) = rows(run_dir, "SELECT image_id FROM images")
    pid = {p: pair_id(image["image_id"], concept_id(p)) for p in VOTES}
    # The documented label file written as one CSV: pair rows leave mask_id and good blank, mask rows leave the pair columns blank;
    # the last row labels a pair but names none (its pair_id is blank): it is a label that matches nothing.
    labels = tmp_path / "labels.csv"
    labels.write_text(
        f"pair_id,present,exhaustive,mask_id,good\n{pid['dog']},yes,,,\n{pid['bus']},no,yes,,\n,,,dog-c,yes\n,,,dog-d,no\n,yes,,,\n"
    )
    table = storage.read_table(str(labels), load_config(None, {}).storage)
    assert table.column("pair_id").null_count == 3 and table.column("mask_id").null_count == 3
    counts = import_labels(TableStore(str(run_dir)), table, "human")
    assert counts == {"pairs": 2, "masks": 2, "unmatched": 1}
    human = {r["phrase"]: r for r in rows(run_dir, "SELECT * FROM pair_verifications WHERE verifier = 'human'")}
    assert (human["dog"]["presence"], human["dog"]["accepted_masks"], human["bus"]["exhaustivity"]) == ("present", 1, "exhaustive")
    report = calibrate(TableStore(str(run_dir)), table, "v1", 0.9)
    assert report["labels"]["given"] == {"pairs": 3, "masks": 2} and report["labels"]["matched"]["pairs"] == 2
