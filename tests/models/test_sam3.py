"""The SAM 3 wrapper on a tiny random-weight model: same classes and code path as the real one."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from sam3_engine.models.sam3 import ModelLoadError, Sam3Segmenter, choose_model, rle_encode
from sam3_engine.models.vlm import choose_vlm
from sam3_engine.text.concepts import TEXT_CONTEXT

THRESHOLD = 0.3
"""The default keep-threshold; tiny-random's init spreads scores around it (see tiny_random_config)."""


@pytest.fixture(scope="module")
def segmenter():
    return Sam3Segmenter.load("tiny-random")


@pytest.fixture(scope="module")
def photos(photos_dir):
    return [ImageOps.exif_transpose(Image.open(photos_dir / name)) for name in ("groceries.jpg", "truck.jpg")]


def test_batched_phrases_equal_the_one_phrase_loop(segmenter, photos):
    phrases = [["grocery bag", "car", "vegetable", "paper bag", "trunk"], ["pickup truck", "wall", "stairs"]]
    batched = segmenter.predict(photos, phrases, threshold=THRESHOLD, phrase_batch=4)
    looped = [
        [segmenter.predict([image], [[p]], threshold=THRESHOLD)[0][0] for p in image_phrases]
        for image, image_phrases in zip(photos, phrases, strict=True)
    ]
    total = identical = 0
    for image_batched, image_looped in zip(batched, looped, strict=True):
        for a, b in zip(image_batched, image_looped, strict=True):
            assert abs(a.presence_score - b.presence_score) < 1e-5
            assert len(a.instances) == len(b.instances)
            for x, y in zip(a.instances, b.instances, strict=True):
                assert abs(x.score - y.score) < 1e-5 and abs(x.object_score - y.object_score) < 1e-5
                # Batch size changes float reduction order (logits differ by ~1e-9), which can flip a
                # pixel whose upsampled logit is within 1e-9 of zero: at most one in a million.
                assert x.mask.shape == y.mask.shape
                assert np.count_nonzero(x.mask != y.mask) <= x.mask.size // 1_000_000
                identical += np.array_equal(x.mask, y.mask)
                total += 1
    assert total > 0, "the threshold must keep real instances"
    assert identical >= total - 1


def test_masks_are_at_the_oriented_original_resolution(segmenter, photos):
    rotated = photos[1].transpose(Image.Transpose.ROTATE_90)
    (pair,) = segmenter.predict([rotated], [["truck"]], threshold=THRESHOLD)[0]
    assert pair.instances and all(i.mask.shape == (rotated.height, rotated.width) and i.mask.dtype == bool for i in pair.instances)
    assert any(i.mask.any() for i in pair.instances)
    assert all(0.0 <= i.stability <= 1.0 for i in pair.instances)


def test_a_detection_whose_mask_covers_no_pixel_is_not_an_instance(segmenter):
    """At 1 x 1 pixels many masks vanish when upsampled: such a detection has no mask to export or verify."""
    (prediction,) = segmenter.predict([Image.new("RGB", (1, 1), (120, 30, 30))], [["red"]], threshold=0.0)[0]
    queries = segmenter.model.config.detr_decoder_config.num_queries
    assert 0 < len(prediction.instances) < queries  # every query passes threshold 0; those with an empty mask were dropped
    assert prediction.empty_masks == queries - len(prediction.instances)  # ... and counted
    assert all(mask_utils.area(instance.rle) == 1 for instance in prediction.instances)


def test_long_phrases_are_truncated_and_flagged(segmenter):
    long_phrase = " ".join(["very"] * 60) + " long truck"
    with pytest.warns(UserWarning, match="truncated"):
        tokens = segmenter.tokenize(["truck", long_phrase])
    assert tokens.truncated == (False, True)
    assert tokens.input_ids.shape == (2, TEXT_CONTEXT)


def test_save_pretrained_directory_round_trip(segmenter, photos, tmp_path):
    segmenter.model.save_pretrained(tmp_path)
    segmenter.processor.save_pretrained(tmp_path)
    assert choose_model(str(tmp_path), None, False).name == str(tmp_path)
    loaded = Sam3Segmenter.load(str(tmp_path))
    assert not loaded.random_weights and loaded.model_id == str(tmp_path)
    a = segmenter.predict(photos[:1], [["bag"]], threshold=THRESHOLD)[0][0]
    b = loaded.predict(photos[:1], [["bag"]], threshold=THRESHOLD)[0][0]
    assert abs(a.presence_score - b.presence_score) < 1e-6 and len(a.instances) == len(b.instances) > 0


@pytest.mark.parametrize("choose", [choose_model, choose_vlm])
def test_a_local_directory_that_is_not_a_checkpoint_is_refused_before_any_work(choose, tmp_path):
    with pytest.raises(ModelLoadError, match="the directory has no config.json"):
        choose(str(tmp_path), None, True)  # a mistake, not an unreachable hub: no fallback
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"the directory has no weights \(model.safetensors, "):
        choose(str(tmp_path), None, False)
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    assert choose(str(tmp_path), None, False).name == str(tmp_path)


def test_gated_or_unreachable_weights_give_an_actionable_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as error:
        Sam3Segmenter.load("facebook/sam3", revision="main")
    message = str(error.value)
    for hint in ("facebook/sam3", "huggingface-cli login", "licence", "save_pretrained", "--model tiny-random"):
        assert hint in message


def test_tiny_random_is_deterministic(photos):
    a = Sam3Segmenter.load("tiny-random").predict(photos[:1], [["bag"]], threshold=THRESHOLD)[0][0]
    b = Sam3Segmenter.load("tiny-random").predict(photos[:1], [["bag"]], threshold=THRESHOLD)[0][0]
    assert a.instances, "the comparison needs kept instances: two empty lists are equal whatever the weights"
    assert [i.score for i in a.instances] == [i.score for i in b.instances] and a.presence_score == b.presence_score
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.instances, b.instances, strict=True))
    assert torch.get_default_dtype() == torch.float32


def test_device_rle_equals_pycocotools_encode():
    rng = np.random.default_rng(0)
    masks = [
        np.zeros((5, 7), bool),
        np.ones((5, 7), bool),
        rng.random((5, 7)) > 0.5,
        np.eye(6, 4, dtype=bool),  # first pixel set: the RLE starts with an empty run of zeros
        np.ones((1, 1), bool),
        rng.random((240, 320)) > 0.97,
    ]
    for mask in masks:
        (ours,) = rle_encode(torch.from_numpy(mask)[None])
        reference = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
        assert ours == reference, mask.shape
    batch = np.stack([rng.random((9, 11)) > t for t in (0.0, 0.5, 1.0)])  # all ones, random, all zeros
    assert rle_encode(torch.from_numpy(batch)) == [mask_utils.encode(np.asfortranarray(m, dtype=np.uint8)) for m in batch]
    assert rle_encode(torch.zeros((0, 3, 3), dtype=torch.bool)) == []


def test_skipping_masks_of_phrases_without_instances_changes_nothing(segmenter, photos):
    phrases = [["grocery bag", "car", "vegetable", "paper bag", "trunk", "sky"], ["pickup truck", "wall", "stairs", "dog"]]
    best = segmenter.predict(photos, phrases, threshold=2.0)
    assert not any(pair.instances for image in best for pair in image)
    # A threshold between the phrases' best scores, so that some phrases keep instances and some do not.
    threshold = float(np.median([pair.max_score for image in best for pair in image]))
    gated = segmenter.predict(photos, phrases, threshold=threshold)
    segmenter.decode_all_masks = True
    try:
        full = segmenter.predict(photos, phrases, threshold=threshold)
    finally:
        segmenter.decode_all_masks = False
    flat_gated = [p for image in gated for p in image]
    flat_full = [p for image in full for p in image]
    assert any(p.instances for p in flat_gated) and any(not p.instances for p in flat_gated), "the test needs both kinds of phrases"
    for a, b in zip(flat_gated, flat_full, strict=True):
        assert a.presence_score == b.presence_score
        assert [(i.query, i.score, i.box_xyxy) for i in a.instances] == [(i.query, i.score, i.box_xyxy) for i in b.instances]
        for x, y in zip(a.instances, b.instances, strict=True):
            assert np.count_nonzero(x.mask != y.mask) <= x.mask.size // 1_000_000
            assert abs(x.stability - y.stability) < 1e-4


def test_foreground_and_box_reprompt_equal_a_plain_forward(segmenter, photos):
    """The verification outputs, recomputed here with SAM 3's own full forward, without the engine's deferral or batching."""
    from torchvision.ops import box_iou

    photo, phrase = photos[1], "pickup truck"
    segmenter.reprompt_boxes = True
    try:
        (prediction,) = segmenter.predict([photo], [[phrase]], threshold=THRESHOLD)[0]
    finally:
        segmenter.reprompt_boxes = False
    assert prediction.instances, "the test needs kept instances"
    without = segmenter.predict([photo], [[phrase]], threshold=THRESHOLD)[0][0]
    assert all(i.reprompt_iou is None for i in without.instances)
    assert [(i.query, i.score) for i in without.instances] == [
        (i.query, i.score) for i in prediction.instances
    ]  # re-prompting changes nothing else

    model = segmenter.model
    pixels = segmenter.preprocess([photo])
    tokens = segmenter.tokenize([phrase])
    with torch.inference_mode():
        out = model(pixel_values=pixels, input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        semantic = torch.nn.functional.interpolate(
            out.semantic_seg.float(), size=(photo.height, photo.width), mode="bilinear", align_corners=False
        )[0, 0]
        expected = mask_utils.encode(np.asfortranarray((semantic > 0).numpy().astype(np.uint8)))
        assert prediction.foreground["counts"] == expected["counts"]
        for instance in prediction.instances:
            box = out.pred_boxes[0, instance.query]
            cxcywh = torch.cat([(box[:2] + box[2:]) / 2, box[2:] - box[:2]])[None, None]
            again = model(pixel_values=pixels, input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, input_boxes=cxcywh)
            best = int(box_iou(box[None], again.pred_boxes[0]).argmax())
            a, b = again.pred_masks[0, best] > 0, out.pred_masks[0, instance.query] > 0
            assert instance.reprompt_iou == pytest.approx(float((a & b).sum() / (a | b).sum()), abs=1e-6)
    assert any(i.reprompt_iou < 1.0 for i in prediction.instances)  # not trivially equal masks
