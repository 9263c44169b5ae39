"""cgF1 on hand-computed cases, and against the official SA-Co evaluation on random inputs."""

import importlib.util
import json
import math
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from sam3_engine.metrics.cgf1 import IOU_THRESHOLDS, EvaluationError, evaluate

OFFICIAL_WHEEL = "sam3==0.1.4"
SIZE = 20


def _rle(top, left, height, width, size=SIZE):
    mask = np.zeros((size, size), np.uint8)
    mask[top : top + height, left : left + width] = 1
    encoded = mask_utils.encode(np.asfortranarray(mask))
    return {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}


def _gt(pairs, exhaustive=None):
    """pairs: {pair_id: [(box, iscrowd), ...]}: an SA-Co ground-truth file."""
    images = [
        {
            "id": p,
            "file_name": f"{p}.jpg",
            "text_input": "thing",
            "width": SIZE,
            "height": SIZE,
            "is_instance_exhaustive": int((exhaustive or {}).get(p, 1)),
            "is_pixel_exhaustive": 1,
        }
        for p in pairs
    ]
    annotations = []
    for pair, regions in pairs.items():
        for box, crowd in regions:
            rle = _rle(*box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": pair,
                    "category_id": 1,
                    "segmentation": rle,
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "area": float(mask_utils.area(rle)),
                    "iscrowd": crowd,
                }
            )
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "object"}]}


def _pred(pair, box, score=0.9):
    rle = _rle(*box)
    return {"image_id": pair, "category_id": 1, "segmentation": rle, "bbox": mask_utils.toBbox(rle).tolist(), "score": score}


def _f1(tp, fp, fn):
    p, r = tp / (tp + fp + 1e-4), tp / (tp + fn + 1e-4)
    return 2 * p * r / (p + r + 1e-4)


def _mcc(tp, fp, tn, fn):
    return (tp * tn - fp * fn) / (math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) + 1e-6)


A, B, C = (2, 2, 6, 6), (10, 10, 5, 8), (3, 12, 4, 4)


def test_perfect_predictions():
    gt = _gt({1: [(A, 0)], 2: [(B, 0), (C, 0)], 3: []})
    result = evaluate([_pred(1, A), _pred(2, C), _pred(2, B)], [gt])
    assert result["image_level"] == {**result["image_level"], "IL_TP": 2, "IL_TN": 1, "IL_FP": 0, "IL_FN": 0}
    assert result["IL_MCC"] == pytest.approx(_mcc(2, 0, 1, 0), abs=1e-12)
    assert result["pmF1"] == pytest.approx(100 * _f1(3, 0, 0), abs=1e-9)
    assert result["cgF1"] == pytest.approx(100 * _f1(3, 0, 0) * _mcc(2, 0, 1, 0), abs=1e-9)


def test_no_predictions_and_all_negative():
    gt = _gt({1: [(A, 0)], 2: []})
    empty = evaluate([], [gt])
    assert (empty["cgF1"], empty["pmF1"], empty["IL_MCC"]) == (0.0, 0.0, 0.0)
    assert empty["image_level"]["IL_FN"] == 1 and empty["image_level"]["IL_TN"] == 1
    negatives = evaluate([], [_gt({1: [], 2: []})])
    assert negatives["image_level"]["IL_TN"] == 2 and negatives["cgF1"] == 0.0
    fired = evaluate([_pred(2, A)], [_gt({1: [], 2: []})])
    assert fired["image_level"]["IL_FP"] == 1 and fired["precision"] == 0.0


def test_one_missed_instance_and_a_duplicate():
    gt = _gt({1: [(A, 0), (B, 0)]})
    missed = evaluate([_pred(1, A)], [gt])
    assert missed["pmF1"] == pytest.approx(100 * _f1(1, 0, 1), abs=1e-9) and missed["recall"] == pytest.approx(1 / (2 + 1e-4))
    duplicated = evaluate([_pred(1, A), _pred(1, A, 0.8), _pred(1, B)], [gt])
    assert duplicated["pmF1"] == pytest.approx(100 * _f1(2, 1, 0), abs=1e-9)
    below = evaluate([_pred(1, A), _pred(1, B, 0.49)], [gt])  # only scores >= 0.5 count
    assert below["pmF1"] == missed["pmF1"]


def test_iou_thresholds_count_a_loose_match_only_below_its_iou():
    gt = _gt({1: [((0, 0, 10, 10), 0)]})
    loose = evaluate([_pred(1, (0, 0, 10, 7))], [gt])  # IoU 0.7: a match at 0.50..0.70, a miss above
    hits = (0.7 >= IOU_THRESHOLDS).sum()
    expected = np.mean([_f1(1, 0, 0)] * hits + [_f1(0, 1, 1)] * (10 - hits))
    assert loose["pmF1"] == pytest.approx(100 * expected, abs=1e-9)
    assert loose["pmF1@0.5"] == pytest.approx(100 * _f1(1, 0, 0), abs=1e-9) and loose["pmF1@0.75"] == 0.0


def test_crowd_ground_truth_is_ignored_and_non_exhaustive_pairs_are_not_evaluated():
    gt = _gt({1: [(A, 1)], 2: [(B, 0)], 3: [(C, 0)]}, exhaustive={3: 0})
    result = evaluate([_pred(1, A), _pred(2, B), _pred(3, A)], [gt])
    assert result["pairs"] == 2  # pair 3 is not instance-exhaustive
    assert result["image_level"]["IL_FP"] == 1  # a prediction on crowd only is a false positive at the pair level
    assert result["image_level"]["IL_TP"] == 1


def test_several_ground_truth_files_take_the_best_per_pair():
    gt_a = _gt({1: [(A, 0)], 2: [(B, 0)], 3: [(C, 0)]})
    gt_b = _gt({1: [(A, 0), (B, 0)], 2: [], 3: [(C, 0)]}, exhaustive={3: 0})
    predictions = [_pred(1, A), _pred(1, B)]
    result = evaluate(predictions, [gt_a, gt_b])
    # pair 1: file b matches both predictions (F1 1 against 0.67); pair 2: b says no instance and nothing
    # was predicted, a perfect negative; pair 3 is excluded because file b marks it not exhaustive.
    assert result["pairs"] == 2
    assert result["image_level"] == {**result["image_level"], "IL_TP": 1, "IL_TN": 1, "IL_FN": 0}
    assert result["pmF1"] == pytest.approx(100 * _f1(2, 0, 0), abs=1e-9)
    single = evaluate(predictions, [gt_a])
    assert single["pmF1"] < result["pmF1"] and single["image_level"]["IL_FN"] == 2


def test_bad_inputs_are_clear_errors():
    with pytest.raises(EvaluationError, match="is_instance_exhaustive"):
        evaluate([], [{"images": [{"id": 1}], "annotations": [], "categories": []}])
    with pytest.raises(EvaluationError, match="no `annotations` list"):
        evaluate([], [{"images": []}])
    with pytest.raises(EvaluationError, match="iou type"):
        evaluate([], [_gt({})], iou_type="keypoints")


def _without(data, section, key):
    copy = json.loads(json.dumps(data))
    for item in copy[section]:
        item.pop(key)
    return copy


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_a_pair_missing_from_a_later_ground_truth_file_is_scored_on_the_files_that_have_it(iou_type):
    gt_a = _gt({1: [(A, 0)], 2: [(B, 0)]})
    gt_b = _gt({1: [(A, 0)]})
    result = evaluate([_pred(1, A), _pred(2, B)], [gt_a, gt_b], iou_type=iou_type, allow_mismatch=True)
    assert result["pairs"] == 2 and result["image_level"]["IL_TP"] == 2 and result["pmF1"] == pytest.approx(100 * _f1(2, 0, 0))


def test_malformed_ground_truth_and_predictions_name_the_file_and_key():
    gt = _gt({1: [(A, 0)], 2: []})
    for section, key, where in (
        ("annotations", "segmentation", "annotations[0]"),
        ("annotations", "image_id", "annotations[0]"),
        ("annotations", "id", "annotations[0]"),
        ("images", "height", "images[0]"),
        ("images", "id", "images[0]"),
    ):
        with pytest.raises(EvaluationError, match=re.escape(f"gt.json: {where} has no `{key}`")):
            evaluate([_pred(1, A)], [_without(gt, section, key)], names=["gt.json"], prediction_name="pred.json")
    bad_predictions = {
        "pred.json: expected a list of predictions (a COCO results file), got an object": {"annotations": [_pred(1, A)]},
        "pred.json[0] is a number, not an object": [7, 8],
        "pred.json[0] has no `score`": [{k: v for k, v in _pred(1, A).items() if k != "score"}],
        'pred.json[0]: `score` must be a number, not "0.9"': [{**_pred(1, A), "score": "0.9"}],
        "pred.json[0] has neither `segmentation` nor `bbox`": [{"image_id": 1, "category_id": 1, "score": 0.9}],
        "pred.json[0]: `segmentation` must be polygons or an RLE": [{**_pred(1, A), "segmentation": "Z16>0"}],
    }
    for message, predictions in bad_predictions.items():
        with pytest.raises(EvaluationError, match="^" + re.escape(message)):
            evaluate(predictions, [gt], names=["gt.json"], prediction_name="pred.json")


def _broken(rle, counts):
    return {**rle, "counts": counts}


def test_bad_references_are_counted_and_fail_unless_allowed():
    gt = _gt({1: [(A, 0)], 2: [(B, 0)], 3: [(C, 0)], 4: []})
    gt["annotations"].append({**gt["annotations"][0], "id": 99, "image_id": 42})  # names no image
    gt["annotations"][1]["segmentation"] = _broken(gt["annotations"][1]["segmentation"], "zz")  # pair 2's truth does not decode
    predictions = [_pred(1, A), _pred(2, B), _pred(3, C), _pred(17, A), _pred(18, B)]  # 17, 18: no such pair
    predictions[2]["segmentation"] = _rle(*C, size=SIZE + 5)  # pair 3: a mask of another size than its image
    predictions.append({**_pred(1, B), "segmentation": _broken(_rle(*B), "0a")})  # ends inside a run
    with pytest.raises(EvaluationError) as raised:
        evaluate(predictions, [gt], names=["gt.json"], prediction_name="pred.json")
    message = str(raised.value)
    assert "\n" not in message
    for part in (
        "gt.json: 1 annotation(s) with an image_id that is not an image of the file (id 99 names image 42)",
        "gt.json: 1 RLE mask(s) whose counts do not decode to height x width pixels (annotation id 2: size [20, 20])",
        "pred.json: 2 prediction(s) with an image_id that no ground-truth file has ([3] image_id 17, [4] image_id 18)",
        "pred.json: 1 RLE mask(s) whose size is not their image's [height, width] ([2]: size [25, 25], image [20, 20])",
        "pred.json: 1 RLE mask(s) whose counts do not decode to height x width pixels ([5]: size [20, 20])",
        "--allow-mismatch",
    ):
        assert part in message
    allowed = evaluate(predictions, [gt], names=["gt.json"], prediction_name="pred.json", allow_mismatch=True)
    assert allowed["mismatches"] == {
        "predictions_unknown_pair": 2,
        "predictions_unknown_category": 0,
        "annotations_unknown_pair": 1,
        "rle_undecodable": 2,
        "rle_wrong_size": 1,
    }
    # As scored: pair 1 a match and a false positive, pairs 2 and 3 a miss and a false positive each (nothing matches their
    # masks), pair 4 a true negative; the orphan annotation and the unknown pairs' predictions count nowhere.
    far = (15, 15, 2, 2)
    same = evaluate([_pred(1, A), _pred(1, far), _pred(2, far), _pred(3, far)], [_gt({1: [(A, 0)], 2: [(B, 0)], 3: [(C, 0)], 4: []})])
    assert {k: v for k, v in allowed.items() if k != "mismatches"} == {k: v for k, v in same.items() if k != "mismatches"}
    assert same["mismatches"] == dict.fromkeys(allowed["mismatches"], 0)


def test_a_mask_that_does_not_decode_never_reaches_pycocotools():
    gt = _gt({1: [(A, 0)]})
    endless = _broken(_rle(*A), "o" * 6 + "1")  # one run of about 2^30 pixels: pycocotools would walk it for minutes
    result = evaluate([{**_pred(1, A), "segmentation": endless}], [gt], allow_mismatch=True)
    assert result["mismatches"]["rle_undecodable"] == 1 and result["image_level"]["IL_TP"] == 1 and result["pmF1"] < 1


@pytest.fixture(scope="session")
def official(tmp_path_factory):
    """The official evaluator, cgf1_eval.py from the sam3 wheel on PyPI (its package needs CUDA to import; this file does not)."""
    folder = tmp_path_factory.mktemp("official")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", OFFICIAL_WHEEL, "-d", str(folder)], check=True, timeout=300
    )
    (wheel,) = folder.glob("sam3-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (folder / "cgf1_eval.py").write_bytes(archive.read("sam3/eval/cgf1_eval.py"))
    spec = importlib.util.spec_from_file_location("official_cgf1_eval", folder / "cgf1_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _random_case(rng, files):
    pairs = {}
    for pair in range(1, 41):
        count = int(rng.choice([0, 0, 1, 2, 3, 5]))
        pairs[pair] = [
            (
                (int(rng.integers(0, 14)), int(rng.integers(0, 14)), int(rng.integers(1, 7)), int(rng.integers(1, 7))),
                int(rng.random() < 0.1),
            )
            for _ in range(count)
        ]
    truths = []
    for index in range(files):
        # later files disagree on some instances, and on exhaustivity
        varied = {p: [r for r in regions if index == 0 or rng.random() > 0.3] for p, regions in pairs.items()}
        truths.append(_gt(varied, exhaustive={p: int(rng.random() > 0.1) for p in pairs}))
    predictions = []
    for pair, regions in pairs.items():
        for (top, left, height, width), _ in regions:
            if rng.random() < 0.8:  # near the truth: jittered
                box = (max(0, top + int(rng.integers(-1, 2))), left, height + int(rng.integers(0, 2)), width)
                predictions.append(_pred(pair, box, float(rng.random())))
        for _ in range(int(rng.integers(0, 3))):  # spurious
            predictions.append(_pred(pair, (int(rng.integers(0, 15)), int(rng.integers(0, 15)), 4, 4), float(rng.random())))
    return predictions, truths


@pytest.mark.parametrize("seed,files,iou_type", [(0, 1, "segm"), (1, 3, "segm"), (2, 1, "bbox"), (3, 3, "bbox"), (4, 2, "segm")])
def test_agrees_with_the_official_evaluation_on_random_inputs(official, tmp_path, seed, files, iou_type):
    import contextlib
    import io
    import json

    rng = np.random.default_rng(seed)
    predictions, truths = _random_case(rng, files)
    paths = []
    for i, truth in enumerate(truths):
        path = tmp_path / f"gt_{i}.json"
        path.write_text(json.dumps(truth))
        paths.append(str(path))
    pred_path = tmp_path / "pred.json"
    pred_path.write_text(json.dumps(predictions))
    with contextlib.redirect_stdout(io.StringIO()):
        expected = official.CGF1Evaluator(paths if files > 1 else paths[0], iou_type=iou_type).evaluate(str(pred_path))
    ours = evaluate(json.loads(pred_path.read_text()), truths, iou_type)["official"]
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("seed,files", [(5, 1), (6, 3)])
def test_bad_references_allowed_score_as_the_official_evaluation_does(official, tmp_path, seed, files):
    import contextlib
    import io

    rng = np.random.default_rng(seed)
    predictions, truths = _random_case(rng, files)
    for prediction in predictions[::7]:  # masks of another size than their image
        prediction["segmentation"] = _rle(2, 2, 4, 4, size=SIZE + 3)
    predictions += [_pred(1000 + i, A) for i in range(3)]  # pairs no file has
    truths[0]["annotations"][3]["segmentation"] = _rle(2, 2, 4, 4, size=SIZE - 2)
    truths[-1]["annotations"].append({**truths[-1]["annotations"][0], "id": 10_000, "image_id": 999})  # an image no file has
    paths = []
    for i, truth in enumerate(truths):
        paths.append(tmp_path / f"gt_{i}.json")
        paths[-1].write_text(json.dumps(truth))
    (tmp_path / "pred.json").write_text(json.dumps(predictions))
    with contextlib.redirect_stdout(io.StringIO()):
        expected = official.CGF1Evaluator([str(p) for p in paths] if files > 1 else str(paths[0])).evaluate(str(tmp_path / "pred.json"))
    ours = evaluate(json.loads((tmp_path / "pred.json").read_text()), truths, allow_mismatch=True)
    assert ours["mismatches"]["rle_wrong_size"] == len(predictions[:-3:7]) + 1
    assert ours["mismatches"]["predictions_unknown_pair"] == 3 and ours["mismatches"]["annotations_unknown_pair"] == 1
    for key, value in expected.items():
        assert ours["official"][key] == pytest.approx(value, abs=1e-9), key


def test_the_eval_command_prints_the_metrics_of_several_files(tmp_path):
    import json

    predictions, truths = _random_case(np.random.default_rng(7), 3)
    paths = [tmp_path / f"gt_{i}.json" for i in range(3)]
    for path, truth in zip(paths, truths, strict=True):
        path.write_text(json.dumps(truth))
    (tmp_path / "pred.json").write_text(json.dumps(predictions))
    done = subprocess.run(
        [sys.executable, "-m", "sam3_engine", "eval", "--pred", str(tmp_path / "pred.json"), "--gt", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed == json.loads(json.dumps(evaluate(predictions, truths)))
    assert printed["pairs"] > 0 and 0 < printed["cgF1"] < 100
    (tmp_path / "bad.json").write_text("{nope")
    bad = subprocess.run(
        [sys.executable, "-m", "sam3_engine", "eval", "--pred", str(tmp_path / "bad.json"), "--gt", str(paths[0])],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr
    (tmp_path / "elsewhere.json").write_text(json.dumps(predictions + [_pred(1000, A)]))
    elsewhere = [sys.executable, "-m", "sam3_engine", "eval", "--pred", str(tmp_path / "elsewhere.json"), "--gt", str(paths[0])]
    refused = subprocess.run(elsewhere, capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr == (
        f"error: {tmp_path / 'elsewhere.json'}: 1 prediction(s) with an image_id that no ground-truth file has "
        f"([{len(predictions)}] image_id 1000); --allow-mismatch evaluates anyway, "
        "counting them under `mismatches`\n"
    )
    allowed = subprocess.run([*elsewhere, "--allow-mismatch"], capture_output=True, text=True)
    assert allowed.returncode == 0 and "predictions_unknown_pair': 1" in allowed.stderr
    assert json.loads(allowed.stdout)["mismatches"]["predictions_unknown_pair"] == 1
    (tmp_path / "scores.json").write_text(json.dumps([{**p, "score": str(p["score"])} for p in predictions]))
    strings = subprocess.run(
        [sys.executable, "-m", "sam3_engine", "eval", "--pred", str(tmp_path / "scores.json"), "--gt", str(paths[0])],
        capture_output=True,
        text=True,
    )
    assert strings.returncode == 2 and strings.stderr.startswith(f"error: {tmp_path / 'scores.json'}[0]: `score` must be a number")
    assert "Traceback" not in strings.stderr and len(strings.stderr.splitlines()) == 1


def _normalised(gt):
    """``gt`` with its boxes as SA-Co writes them: fractions of the image."""
    copy = json.loads(json.dumps(gt))
    for annotation in copy["annotations"]:
        annotation["bbox"] = [value / SIZE for value in annotation["bbox"]]
    return copy


def _uncompressed(top, left, height, width):
    """``_rle``'s mask as an uncompressed RLE: counts a list of runs, column by column, from a run of 0s."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[top : top + height, left : left + width] = 1
    flat = mask.flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    return {"size": [SIZE, SIZE], "counts": np.diff(np.concatenate(([0], edges, [flat.size]))).tolist()}


PERFECT_BOXES = [(1, A), (2, B), (2, C)]
PERFECT = _gt({1: [(A, 0)], 2: [(B, 0), (C, 0)], 3: []})
"""Two positive pairs, three masks, one negative pair: predicting them exactly scores this."""
PERFECT_CGF1 = 100 * _f1(3, 0, 0) * _mcc(2, 0, 1, 0)


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
@pytest.mark.parametrize("keys", [("segmentation", "bbox"), ("segmentation",), ("bbox",)])
@pytest.mark.parametrize("normalised", [True, False], ids=["saco-boxes", "pixel-boxes"])
def test_the_ground_truth_as_predictions_scores_perfectly_whatever_regions_they_carry(iou_type, keys, normalised):
    """A box taken from a mask, or a box drawn as a mask, is in the file's units: fractions of the image (SA-Co) or pixels (COCO)."""
    gt = _normalised(PERFECT) if normalised else PERFECT
    predictions = [{"image_id": a["image_id"], "category_id": 1, "score": 1.0, **{key: a[key] for key in keys}} for a in gt["annotations"]]
    result = evaluate(predictions, [gt], iou_type)
    assert result["cgF1"] == pytest.approx(PERFECT_CGF1, abs=1e-9) and result["image_level"]["IL_FP"] == 0


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_an_uncompressed_rle_without_a_box_scores_as_its_compressed_mask(iou_type):
    uncompressed = [{"image_id": pair, "category_id": 1, "score": 1.0, "segmentation": _uncompressed(*box)} for pair, box in PERFECT_BOXES]
    assert uncompressed[0]["segmentation"]["counts"][:2] == [2 * SIZE + 2, 6]  # two empty columns and two rows, then 6 pixels of A
    assert evaluate(uncompressed, [_normalised(PERFECT)], iou_type)["cgF1"] == pytest.approx(PERFECT_CGF1, abs=1e-9)


def _prediction_with(**changes):
    return [{**_pred(1, A), **changes}]


def _gt_with(section, index, **changes):
    gt = json.loads(json.dumps(PERFECT))
    gt[section][index].update(changes)
    return gt


def _gt_with_a_repeated_image():
    gt = json.loads(json.dumps(PERFECT))
    gt["images"].append(dict(gt["images"][1]))  # a copy of pair 2's entry: evaluated twice, were it allowed
    return gt


MALFORMED = {
    "pred polygon of one point": (_prediction_with(segmentation=[[1, 2]]), PERFECT, "pred.json[0]: `segmentation` polygon 0 must be"),
    "pred polygon of strings": (_prediction_with(segmentation=[["a"] * 6]), PERFECT, "pred.json[0]: `segmentation` polygon 0 must be"),
    "pred no polygon": (_prediction_with(segmentation=[]), PERFECT, "pred.json[0]: `segmentation` is an empty list of polygons"),
    "pred list category": (_prediction_with(category_id=[1]), PERFECT, "pred.json[0]: `category_id` must be a number or a string, not [1]"),
    "gt polygon of one point": ([], _gt_with("annotations", 1, segmentation=[[1, 2]]), "gt.json: annotations[1]: `segmentation` polygon 0"),
    "gt odd polygon": (
        [],
        _gt_with("annotations", 1, segmentation=[[1, 2, 3, 4, 5, 6, 7]]),
        "gt.json: annotations[1]: `segmentation` polygon 0",
    ),
    "gt no polygon": (
        [],
        _gt_with("annotations", 2, segmentation=[]),
        "gt.json: annotations[2]: `segmentation` is an empty list of polygons",
    ),
    "gt list image id": ([], _gt_with("images", 1, id=[2]), "gt.json: images[1]: `id` must be a number or a string, not [2]"),
    "gt list image_id": (
        [],
        _gt_with("annotations", 0, image_id=[1]),
        "gt.json: annotations[0]: `image_id` must be a number or a string, not [1]",
    ),
    "gt object category_id": (
        [],
        _gt_with("annotations", 0, category_id={}),
        "gt.json: annotations[0]: `category_id` must be a number or a string",
    ),
    "gt list category id": ([], _gt_with("categories", 0, id=[1]), "gt.json: categories[0]: `id` must be a number or a string, not [1]"),
    "gt string height": ([], _gt_with("images", 0, height="20"), 'gt.json: images[0]: `height` must be a positive integer, not "20"'),
    "gt repeated image": ([], _gt_with_a_repeated_image(), "gt.json: images[3]: `id` 2 repeats images[1] (one entry per pair)"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_items_are_errors_naming_the_file_item_and_key(case):
    predictions, gt, message = MALFORMED[case]
    with pytest.raises(EvaluationError, match="^" + re.escape(message)):
        evaluate(predictions, [gt], names=["gt.json"], prediction_name="pred.json")


def _eval_command(pred, gt):
    return subprocess.run(
        [sys.executable, "-m", "sam3_engine", "eval", "--pred", str(pred), "--gt", str(gt)], capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "gt_bytes,message",
    [
        (b"PAR1\x15\x04\x15\x9c\x01\x15\xa4\x01L\x15\x06\x15\x00", "not valid JSON (not UTF-8 text: byte 0x9c at offset 7)"),
        (json.dumps(_gt_with_a_repeated_image()).encode(), "images[3]: `id` 2 repeats images[1] (one entry per pair)"),
    ],
    ids=["parquet", "repeated-image"],
)
def test_the_eval_command_refuses_a_bad_ground_truth_in_one_line(tmp_path, gt_bytes, message):
    (tmp_path / "gt.json").write_bytes(gt_bytes)
    (tmp_path / "pred.json").write_text(json.dumps([_pred(1, A)]))
    done = _eval_command(tmp_path / "pred.json", tmp_path / "gt.json")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"error: {tmp_path / 'gt.json'}: {message}\n"


def test_boxes_taken_from_masks_in_a_pixel_box_file_score_as_the_official_evaluation(official, tmp_path):
    """In pixels, a box from a mask is pycocotools' own: nothing changes against the official evaluator."""
    import contextlib
    import io

    predictions, truths = _random_case(np.random.default_rng(8), 1)
    predictions = [{k: v for k, v in p.items() if k != "bbox"} for p in predictions]
    (tmp_path / "gt.json").write_text(json.dumps(truths[0]))
    (tmp_path / "pred.json").write_text(json.dumps(predictions))
    with contextlib.redirect_stdout(io.StringIO()):
        expected = official.CGF1Evaluator(str(tmp_path / "gt.json"), iou_type="bbox").evaluate(str(tmp_path / "pred.json"))
    ours = evaluate(predictions, truths, "bbox")["official"]
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key


def test_a_box_is_taken_only_from_a_mask_that_decodes():
    """Under bbox too, an RLE read for its box is checked first: pycocotools' decoder trusts its counts."""
    endless = {**_pred(1, A), "segmentation": _broken(_rle(*A), "o" * 6 + "1")}
    endless.pop("bbox")
    with pytest.raises(EvaluationError, match=re.escape("pred.json: 1 RLE mask(s) whose counts do not decode")):
        evaluate([endless], [_normalised(PERFECT)], "bbox", prediction_name="pred.json")
    result = evaluate([endless], [_normalised(PERFECT)], "bbox", allow_mismatch=True)
    assert result["mismatches"]["rle_undecodable"] == 1 and result["image_level"]["IL_TP"] == 1 and result["pmF1"] == 0
