"""The CVAT round trip as files: the bundle CVAT imports, an export as CVAT writes it, masks bit for bit."""

import copy
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
import zipfile

import numpy as np
import pytest
from cvat_sdk.api_client import models

from sam3_engine.app.pipeline import run_pipeline
from sam3_engine.engine.catalog import named_query
from sam3_engine.engine.config import load_config
from sam3_engine.labeling.cvat import _cvat_rle, _decode
from sam3_engine.labeling.masks import bitmap_to_coco, coco_to_bitmap, polygon_to_bitmap
from tests.helpers import rewrite, rows, table_cells


def _cli(*args):
    env = {**os.environ, "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-m", "sam3_engine", *args], capture_output=True, text=True, env=env)


@pytest.fixture()
def bundle(quickstart, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(quickstart[0], run)
    assert _cli("select", str(run), "-n", "100", "--name", "round-1", "--max-pairs-per-image", "100").returncode == 0
    done = _cli("labeling", "push", str(run), "--selection", "round-1", "--to", "cvat", "--out", str(tmp_path / "bundle"))
    assert done.returncode == 0, done.stderr
    return run, tmp_path / "bundle"


def _export(tree: ElementTree.ElementTree, path, compression=zipfile.ZIP_STORED):
    """What CVAT's 'CVAT for images 1.1' export is: a zip holding annotations.xml."""
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("annotations.xml", ElementTree.tostring(tree.getroot(), encoding="unicode"))
    return path


def test_the_bundle_holds_every_image_and_the_engines_masks_bit_for_bit(bundle):
    run, folder = bundle
    tree = ElementTree.parse(folder / "annotations.xml")
    images = {image.get("name").rsplit(".", 1)[0]: image for image in tree.getroot().iter("image")}
    selected = rows(run, "SELECT DISTINCT image_id FROM selections")
    assert set(images) == {r["image_id"] for r in selected} and len(list((folder / "images").iterdir())) == len(images)
    engine = rows(run, "SELECT m.image_id, p.phrase, m.rle_counts, m.height, m.width FROM masks m JOIN pairs p USING (pair_id)")
    sizes = {name: (int(image.get("height")), int(image.get("width"))) for name, image in images.items()}
    sent = sorted((m.get("label"), bitmap_to_coco(_decode(m, sizes[name]))) for name, image in images.items() for m in image.iter("mask"))
    nonempty = sorted((r["phrase"], r["rle_counts"]) for r in engine if coco_to_bitmap(r["rle_counts"], r["height"], r["width"]).any())
    assert sent == nonempty
    labels = {label.findtext("name"): label.findtext("type") for label in tree.getroot().iter("label")}
    assert labels.pop("absent") == labels.pop("reviewed") == "tag" and set(labels.values()) == {"any"}  # masks or polygons
    assert {m.get("source") for image in images.values() for m in image.iter("mask")} == {"auto"}
    for label in json.loads((folder / "labels.json").read_text()):  # what CVAT's API takes
        models.PatchedLabelRequest(**label)
        models.LabelType(label["type"])

    (folder / "images" / "from-an-earlier-push.jpg").write_bytes(b"stale")
    again = _cli("labeling", "push", str(run), "--selection", "round-1", "--to", "cvat", "--out", str(folder))
    assert again.returncode == 0 and sorted(os.listdir(folder / "images")) == sorted(image.get("name") for image in images.values())
    (folder.parent / "afile").write_text("")
    for out, message in ((folder.parent, "not a bundle of selection 'round-1'"), (folder.parent / "afile", "--out ")):
        refused = _cli("labeling", "push", str(run), "--selection", "round-1", "--to", "cvat", "--out", str(out))
        assert refused.returncode == 2 and message in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert ElementTree.parse(folder / "annotations.xml").getroot().findtext("meta/task/name") == "sam3-engine round-1"


def test_a_push_that_fails_part_way_leaves_no_annotations_to_import_and_pushing_again_finishes(bundle, tmp_path):
    run, folder = bundle
    whole = (folder / "annotations.xml").read_bytes()
    selected = rows(run, "SELECT DISTINCT i.image_id, i.uri FROM images i JOIN selections s USING (image_id) ORDER BY i.image_id")
    last = selected[-1]  # written last: every other image is in place when it fails
    rewrite(run, "images", "uri", "image_id", {last["image_id"]: str(tmp_path / "gone.jpg")})
    failed = _cli("labeling", "push", str(run), "--selection", "round-1", "--to", "cvat", "--out", str(folder))
    assert failed.returncode == 2 and "gone.jpg" in failed.stderr and "unfinished (no annotations.xml)" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    assert not (folder / "annotations.xml").exists()  # nothing for CVAT to import beside a missing image
    rewrite(run, "images", "uri", "image_id", {last["image_id"]: last["uri"]})
    again = _cli("labeling", "push", str(run), "--selection", "round-1", "--to", "cvat", "--out", str(folder))
    assert again.returncode == 0, again.stderr  # the unfinished bundle is this selection's: pushing again finishes it
    assert (folder / "annotations.xml").read_bytes() == whole and sorted(os.listdir(folder)) == ["annotations.xml", "images", "labels.json"]


def test_an_export_comes_back_as_answers_and_gold_with_the_persons_masks(bundle, tmp_path):
    run, folder = bundle
    tree = ElementTree.parse(folder / "annotations.xml")
    sql = "SELECT pair_id, image_id, phrase FROM pairs WHERE instance_count >= 2 ORDER BY instance_count DESC, pair_id LIMIT 1"
    multi = rows(run, sql)[0]
    image = next(i for i in tree.getroot().iter("image") if i.get("name").startswith(multi["image_id"]))
    size = (int(image.get("height")), int(image.get("width")))
    ours = [m for m in image.findall("mask") if m.get("label") == multi["phrase"]]
    assert len(ours) >= 2
    kept = bitmap_to_coco(_decode(ours[0], size))
    for mask in ours[1:]:  # the annotator deletes the others ...
        image.remove(mask)
    drawn = np.zeros(size, bool)
    drawn[40:90, 60:200] = True
    drawn[95, 210] = True
    ElementTree.SubElement(image, "mask", label=multi["phrase"], source="manual", occluded="0", z_order="0", **_cvat_rle(drawn))
    outline = [(300.5, 20.0), (360.0, 20.0), (330.0, 70.25)]  # ... outlines one with the polygon tool
    points = ";".join(f"{x},{y}" for x, y in outline)
    ElementTree.SubElement(image, "polygon", label=multi["phrase"], source="manual", occluded="0", z_order="0", points=points)
    other = next(m.get("label") for m in image.findall("mask") if m.get("label") != multi["phrase"])
    for mask in [m for m in image.findall("mask") if m.get("label") == other]:
        image.remove(mask)
    tag = ElementTree.SubElement(image, "tag", label="absent", source="manual")  # ... draws one, and tags a phrase absent
    ElementTree.SubElement(tag, "attribute", name="phrase").text = other
    export = _export(tree, tmp_path / "export.zip")

    done = _cli("labeling", "pull", str(run), "--selection", "round-1", "--from", "cvat", "--in", str(export))
    assert done.returncode == 0, done.stderr
    labels = {r["phrase"]: r for r in rows(run, "SELECT * FROM human_labels WHERE image_id = $i", {"i": multi["image_id"]})}
    sql = "SELECT mask_id, rle_counts FROM masks WHERE pair_id = $p"
    engine = {r["mask_id"]: r["rle_counts"] for r in rows(run, sql, {"p": multi["pair_id"]})}
    assert labels[multi["phrase"]]["present"] and [engine[m] for m in labels[multi["phrase"]]["kept_mask_ids"]] == [kept]
    assert labels[other]["present"] is False and labels[multi["phrase"]]["drawn_masks"] == 2
    people = rows(run, "SELECT * FROM human_masks ORDER BY area DESC")
    assert [human["tool"] for human in people] == ["cvat", "cvat"]
    assert np.array_equal(coco_to_bitmap(people[0]["rle_counts"], *size), drawn)  # bit for bit
    assert np.array_equal(coco_to_bitmap(people[1]["rle_counts"], *size), polygon_to_bitmap(outline, *size))
    before = rows(run, "SELECT * FROM human_labels ORDER BY pair_id")
    assert _cli("labeling", "pull", str(run), "--selection", "round-1", "--from", "cvat", "--in", str(export)).returncode == 0
    assert rows(run, "SELECT * FROM human_labels ORDER BY pair_id") == before  # the same export twice: the same rows

    run_pipeline(load_config(None, {"output": str(run), "stages": "splits"}))
    split_rows = rows(run, "SELECT * FROM splits WHERE image_id = $i", {"i": multi["image_id"]})
    tiers = {r["phrase"]: (r["tier"], r["kind"], r["sources"]) for r in split_rows}
    assert tiers[multi["phrase"]][:2] == ("gold", "positive") and tiers[other][:2] == ("gold", "negative")
    assert "cvat" in tiers[multi["phrase"]][2] and "cvat" in tiers[other][2]  # machine verifiers that agree are listed beside it

    humans = ["human", "label-studio", "cvat"]
    (loop,) = rows(run, named_query("loop_rounds"), {"human_verifiers": humans})
    selected = rows(run, "SELECT count(*) AS n FROM selections")[0]["n"]
    answered = rows(run, "SELECT count(*) AS n FROM human_labels")[0]["n"]  # the touched image's every phrase: kept masks count too
    gold = rows(run, "SELECT count(*) AS n FROM splits WHERE tier = 'gold' AND list_contains(sources, 'cvat')")[0]["n"]
    assert answered >= 2 and (loop["selected"], loop["answered"], loop["pending"], loop["gold_pairs"]) == (
        selected,
        answered,
        selected - answered,
        gold,
    )
    # pooled over the machine verifiers (CLIP and VLM): one verdict per pair and verifier
    machine = rows(run, "SELECT pair_id, presence FROM pair_verifications WHERE NOT list_contains($h, verifier)", {"h": humans})
    truth = {r["pair_id"]: r["present"] for r in rows(run, "SELECT pair_id, present FROM human_labels")}
    said = [(r["pair_id"], r["presence"]) for r in machine if r["pair_id"] in truth]
    called_present = [pair for pair, presence in said if presence == "present"]
    expected = sum(truth[p] for p in called_present) / len(called_present) if called_present else None
    on_present = [presence for pair, presence in said if truth[pair]]
    recall = sum(presence == "present" for presence in on_present) / len(on_present) if on_present else None
    assert loop["present_precision"] == expected and loop["present_recall"] == recall
    judged = {}
    for label in rows(run, "SELECT kept_mask_ids, dropped_mask_ids FROM human_labels"):
        judged |= {m: True for m in label["kept_mask_ids"]} | {m: False for m in label["dropped_mask_ids"]}
    machine_accepted = rows(run, "SELECT mask_id FROM mask_verifications WHERE verdict = 'accept' AND verifier <> 'cvat'")
    accepted = [r["mask_id"] for r in machine_accepted if r["mask_id"] in judged]
    assert loop["accept_precision"] == (sum(judged[m] for m in accepted) / len(accepted) if accepted else None)
    report = _cli("loop-report", str(run))
    assert report.returncode == 0 and "round-1" in report.stdout and multi["phrase"] in report.stdout
    assert max(len(line) for line in report.stdout.splitlines()) <= 80 and "…" not in report.stdout  # wrapped, never cut

    page = tmp_path / "report.html"  # the HTML report's loop section shows the same numbers
    assert _cli("report", str(run), "--out", str(page), "--gallery", "0").returncode == 0
    (shown,) = table_cells(page.read_text(), "loop-rounds").rows
    numbers = ("selected", "answered", "pending", "drawn_masks", "gold_pairs", "gold_concepts")
    assert shown["selection"] == "round-1" and {key: int(shown[key]) for key in numbers} == {key: loop[key] for key in numbers}
    assert shown["present_precision"] == ("" if expected is None else f"{expected:.3f}")
    gold_rows = rows(run, named_query("loop_gold"), {"human_verifiers": humans})
    assert {(r["phrase"], int(r["gold_positives"])) for r in table_cells(page.read_text(), "loop-gold").rows} == {
        (r["phrase"], r["gold_positives"]) for r in gold_rows
    }
    assert 'id="loop-pairs"' in page.read_text() and 'id="loop-agreement"' in page.read_text()


def test_bad_exports_are_skipped_by_reason_or_refused_in_a_line(bundle, tmp_path):
    run, folder = bundle
    tree = ElementTree.parse(folder / "annotations.xml")
    by_labels = sorted(tree.getroot().iter("image"), key=lambda i: -len({m.get("label") for m in i.findall("mask")}))
    reviewed, first, badsize = by_labels[:3]  # the first with the most phrases painted by the engine
    phrases = {r["image_id"]: r["phrases"] for r in rows(run, "SELECT image_id, list(phrase) AS phrases FROM selections GROUP BY ALL")}
    width = int(first.get("width"))
    manual = {"source": "manual", "top": "0", "width": "2", "height": "2"}
    known = phrases[first.get("name").rsplit(".", 1)[0]][0]  # the engine's masks stay: skipped shapes are no touch
    ElementTree.SubElement(first, "mask", label="a phrase renamed in CVAT", rle="0, 4", left="0", **manual)
    ElementTree.SubElement(first, "mask", label=known, rle="0, 4", left=str(width - 1), **manual)
    ElementTree.SubElement(first, "mask", label=known, rle="1, 9", left="0", **manual)
    ElementTree.SubElement(first, "mask", label=known, rle="-50, 54", left="0", **manual)
    ElementTree.SubElement(first, "polygon", label=known, source="manual", points="0,0;5,0")
    ElementTree.SubElement(first, "polygon", label=known, source="manual", points="0,0;5,zero;5,5")
    ElementTree.SubElement(first, "polygon", label=known, source="manual", points=f"{width + 1},0;{width + 9},0;{width + 5},5")
    ElementTree.SubElement(first, "box", label=known, source="manual", xtl="0", ytl="0", xbr="5", ybr="5")
    badsize.set("width", "abc")
    ElementTree.SubElement(badsize, "tag", label="absent", source="manual")
    reviewed_id = reviewed.get("name").rsplit(".", 1)[0]
    reviewed.set("name", "images/" + reviewed.get("name"))  # CVAT keeps the folder of an upload
    deleted = reviewed.find("mask").get("label")  # the person deletes a phrase's masks, then accepts the rest as they are
    for mask in [m for m in reviewed.findall("mask") if m.get("label") == deleted]:
        reviewed.remove(mask)
    ElementTree.SubElement(reviewed, "tag", label="reviewed", source="manual")
    masked = {m.get("label") for m in reviewed.findall("mask")}
    painted = sorted(masked)[0]  # ... and tags absent a phrase still painted: a conflict
    tag = ElementTree.SubElement(reviewed, "tag", label="absent", source="manual")
    ElementTree.SubElement(tag, "attribute", name="phrase").text = painted
    done = _cli("labeling", "pull", str(run), "--selection", "round-1", "--from", "cvat", "--in", str(_export(tree, tmp_path / "e.zip")))
    assert done.returncode == 0, done.stderr
    for reason in (
        "skipped 1 (unknown phrase)",
        "skipped 1 (mask not the image's size)",
        "skipped 2 (undecodable mask)",
        "skipped 2 (undecodable polygon)",
        "skipped 1 (empty mask)",
        "skipped 1 (shape type not supported: box)",
        f"skipped 1 (image size not a number: {badsize.get('name')})",
    ):
        assert reason in done.stderr, done.stderr
    assert len(masked) >= 2 and "skipped 1 (phrase both painted and ticked absent)" in done.stderr
    stored = {(r["image_id"], r["phrase"]): r["present"] for r in rows(run, "SELECT image_id, phrase, present FROM human_labels")}
    assert {image for image, _ in stored} == {reviewed_id}
    assert stored[(reviewed_id, deleted)] is False  # accepted as it is: no mask, so absent
    assert {p: stored[(reviewed_id, p)] for p in phrases[reviewed_id] if p != painted} == {
        p: p in masked for p in phrases[reviewed_id] if p != painted
    }
    assert (reviewed_id, painted) not in stored

    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as archive:
        archive.writestr("readme.txt", "no annotations here")
    twice = ElementTree.parse(folder / "annotations.xml")
    twice.getroot().append(copy.deepcopy(next(twice.getroot().iter("image"))))
    corrupt = bytearray(_export(twice, tmp_path / "corrupt.zip", zipfile.ZIP_DEFLATED).read_bytes())
    start = corrupt.index(b"annotations.xml") + len("annotations.xml")
    corrupt[start + 10 : start + 40] = b"\xff" * 30  # the member's compressed data
    (tmp_path / "corrupt.zip").write_bytes(corrupt)
    encrypted = bytearray(_export(tree, tmp_path / "encrypted.zip").read_bytes())
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # the "encrypted" flag, as a password-protected zip has
        encrypted[encrypted.index(signature) + offset] |= 1
    (tmp_path / "encrypted.zip").write_bytes(encrypted)
    for export, message in (
        ("empty.zip", "has no annotations.xml"),
        ("twice.zip", "2 times"),
        ("corrupt.zip", "cannot read"),
        ("encrypted.zip", "without a password"),
    ):
        if export == "twice.zip":
            _export(twice, tmp_path / export)
        done = _cli("labeling", "pull", str(run), "--selection", "round-1", "--from", "cvat", "--in", str(tmp_path / export))
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert len(rows(run, "SELECT * FROM human_labels")) == len(stored)  # a refused export changes nothing
