"""The throughput paths of the SAM 3 wrapper (text cache, bucketed batches, compile fallback, host overlap) give the eager results."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from sam3_engine.models.sam3 import COMPILED_MODULES, Sam3Segmenter, TextCache, bucket
from sam3_engine.models.sam3_attention import attention_report

THRESHOLD = 0.3
PHRASES = [["grocery bag", "car", "vegetable", "paper bag", "trunk"], ["pickup truck", "car", "grocery bag"]]


@pytest.fixture(scope="module")
def photos(photos_dir):
    return [ImageOps.exif_transpose(Image.open(photos_dir / name)) for name in ("groceries.jpg", "truck.jpg")]


@pytest.fixture(scope="module")
def reference(photos):
    """Plain eager results: no text cache, no buckets, no overlap; re-prompting on, so that its path is compared too."""
    segmenter = Sam3Segmenter.load("tiny-random")
    segmenter.text_cache.capacity = 0
    segmenter.reprompt_boxes = True
    return segmenter.predict(photos, PHRASES, threshold=THRESHOLD, phrase_batch=4)


def _segmenter(**settings) -> Sam3Segmenter:
    segmenter = Sam3Segmenter.load("tiny-random")
    segmenter.reprompt_boxes = True
    for key, value in settings.items():
        setattr(segmenter, key, value)
    return segmenter


def assert_same(results, expected, exact: bool, tolerance: float = 1e-5):
    """Equal predictions; inexact allows float noise from a different batch composition (as the batched-equals-looped test)."""
    total = 0
    for image_a, image_b in zip(results, expected, strict=True):
        for a, b in zip(image_a, image_b, strict=True):
            assert [i.query for i in a.instances] == [i.query for i in b.instances]
            if exact:
                assert a == b
                continue
            assert abs(a.presence_score - b.presence_score) < tolerance and abs(a.max_score - b.max_score) < tolerance
            for x, y in zip(a.instances, b.instances, strict=True):
                assert abs(x.score - y.score) < tolerance and abs(x.reprompt_iou - y.reprompt_iou) < 0.01
                assert np.count_nonzero(x.mask != y.mask) <= max(1, x.mask.size // 1_000_000)
            total += len(a.instances)
    assert exact or total > 0, "the comparison needs kept instances"


def test_buckets_are_powers_of_two_capped_at_the_batch():
    assert [bucket(n, 16) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert bucket(5, 6) == 6 and bucket(35, 35) == 35 and bucket(20, 16) == 20


def test_text_cache_is_bounded_least_recently_used_first():
    cache = TextCache(2)
    cache.put("a", torch.zeros(1))
    cache.put("b", torch.ones(1))
    assert cache.get("a") is not None  # "b" is now the least recently used
    cache.put("c", torch.ones(1))
    assert list(cache.entries) == ["a", "c"] and cache.get("b") is None
    nothing = TextCache(0)
    nothing.put("a", torch.zeros(1))
    assert nothing.get("a") is None


def test_cached_text_features_give_the_same_results_and_encode_each_phrase_once(photos, reference):
    segmenter = _segmenter()
    encoded = []
    segmenter.model.text_encoder.register_forward_hook(
        lambda module, args, kwargs, out: encoded.extend(kwargs["input_ids"].tolist()), with_kwargs=True
    )
    results = segmenter.predict(photos, PHRASES, threshold=THRESHOLD, phrase_batch=4)
    again = segmenter.predict(photos, PHRASES, threshold=THRESHOLD, phrase_batch=4)
    distinct = {p for image in PHRASES for p in image}
    assert len(encoded) == len(distinct) == len({tuple(ids) for ids in encoded}), "each distinct phrase encoded once, re-prompts included"
    assert_same(results, reference, exact=False)
    assert_same(again, results, exact=True)


def test_bucketed_batches_equal_unpadded_ones(photos, reference):
    """3 phrases per batch padded to 4, mask-decoder rows and re-prompt chunks padded too; padded rows are dropped."""
    segmenter = _segmenter(bucket_batches=True)
    phrases = [image[:3] for image in PHRASES]
    padded = segmenter.predict(photos, phrases, threshold=THRESHOLD, phrase_batch=4)
    plain = _segmenter().predict(photos, phrases, threshold=THRESHOLD, phrase_batch=4)
    assert_same(padded, plain, exact=False)


def test_host_overlap_gives_the_sequential_results_in_order(photos, reference):
    overlapped = _segmenter(overlap_host=True)
    results = overlapped.predict(photos, PHRASES, threshold=THRESHOLD, phrase_batch=2)
    assert overlapped._host is not None, "the host thread ran"
    sequential = _segmenter(overlap_host=False).predict(photos, PHRASES, threshold=THRESHOLD, phrase_batch=2)
    assert_same(results, sequential, exact=True)


def test_a_compile_error_at_the_first_call_warns_and_gives_eager_results(photos, reference, monkeypatch):
    def broken_compile(fn, **options):
        def fails(*args, **kwargs):
            raise RuntimeError("inductor: no C++ compiler\nsecond line")

        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    segmenter = _segmenter()
    segmenter.compile()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = segmenter.predict(photos, PHRASES, threshold=THRESHOLD, phrase_batch=4)
    messages = [str(w.message) for w in caught if "torch.compile" in str(w.message)]
    assert sorted(m.split("'s ")[1].split(" ")[0] for m in messages) == sorted(COMPILED_MODULES), "one warning per module"
    assert all("\n" not in m and "no C++ compiler" in m for m in messages)
    assert all(getattr(segmenter.model, name).forward.__name__ == "forward" for name in COMPILED_MODULES)
    assert_same(results, reference, exact=False)


def test_an_unknown_backend_warns_at_compile_and_stays_eager(photos, reference):
    segmenter = _segmenter()
    with pytest.warns(UserWarning, match="torch.compile of SAM 3's vision_encoder failed"):
        segmenter.compile(backend="no-such-backend")
    assert_same(segmenter.predict(photos, PHRASES, threshold=THRESHOLD, phrase_batch=4), reference, exact=False)


def test_compiled_equals_eager(photos, reference):
    """The compiled path through dynamo (graphs captured, guards, buckets), run by the eager backend to keep CPU tests fast."""
    segmenter = _segmenter()
    segmenter.compile(backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback to eager would hide the compiled path
        results = segmenter.predict(photos, PHRASES, threshold=THRESHOLD, phrase_batch=4)
    assert all(getattr(segmenter.model, name).forward.__name__ == "forward" for name in COMPILED_MODULES)
    assert_same(results, reference, exact=False)


def test_keep_top_keeps_the_best_queries_of_the_first_phrases(photos):
    segmenter = _segmenter(reprompt_boxes=False, keep_top=(2, 3))
    (image,) = segmenter.predict(photos[:1], [PHRASES[0]], threshold=1.0, phrase_batch=4)
    assert [len(p.instances) for p in image] == [3, 3, 0, 0, 0]
    full = _segmenter(reprompt_boxes=False).predict(photos[:1], [PHRASES[0][:2]], threshold=0.0, phrase_batch=4)[0]
    for kept, every in zip(image[:2], full, strict=True):
        best = sorted(every.instances, key=lambda i: -i.score)[:3]
        assert sorted(i.query for i in kept.instances) == sorted(i.query for i in best)


def test_attention_report_finds_sdpa_in_every_block(photos):
    segmenter = _segmenter(reprompt_boxes=False)
    report = attention_report(segmenter, segmenter.preprocess(photos[:1]), (photos[0].height, photos[0].width), ["car", "bag"])
    assert set(report["attn_implementation"].values()) == {"sdpa"}
    for block in ("vit_windowed", "vit_global", "detr_encoder", "detr_decoder", "mask_decoder"):
        assert report["kernels"].get(block), f"no SDPA kernel recorded for {block}"
        assert report["calls"][block][0]["call"]
    windowed = report["calls"]["vit_windowed"][0]["call"]
    assert "'query': [" in windowed


def test_uint8_pixels_normalised_on_the_device_give_the_float_path_results(photos):
    """Preparation ships resized uint8 pixels (a quarter of float32's bytes); the segmenter rescales and normalises them."""
    from sam3_engine.models.sam3 import resize

    segmenter = _segmenter()
    processor = segmenter.processor.image_processor
    small = resize(processor, photos)
    normalised = segmenter.preprocess(photos)
    assert small.dtype == torch.uint8 and small.shape == normalised.shape
    assert small.element_size() * 4 == normalised.element_size()
    assert torch.allclose(segmenter._normalize(small), normalised, atol=1e-6)
    sizes = [(image.height, image.width) for image in photos]
    from_uint8 = segmenter.predict_pixels(small, sizes, PHRASES, threshold=THRESHOLD, phrase_batch=4)
    from_float = segmenter.predict_pixels(normalised, sizes, PHRASES, threshold=THRESHOLD, phrase_batch=4)
    assert_same(from_uint8, from_float, exact=False)
