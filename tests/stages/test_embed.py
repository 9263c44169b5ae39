"""CLIP embeddings, retrieval and CLIP-filtered hard negatives, with a tiny random-weight open_clip model."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from sam3_engine.app.pipeline import run_pipeline
from sam3_engine.engine.config import load_config
from sam3_engine.models.clip import TINY_RANDOM_ARCHITECTURE, ClipEmbedder, choose_clip
from sam3_engine.models.sam3 import ModelLoadError
from sam3_engine.text.concepts import Ontology
from tests.conftest import EXAMPLES
from tests.helpers import rows

SETTINGS = {
    "clip.model": "tiny-random",
    "retrieve.min_similarity": 0.0,
    "retrieve.top_k": 4,
    "negatives.max_image_similarity": 0.1,
    "negatives.max_per_image": 40,
}


@pytest.fixture(scope="module")
def embedder():
    return ClipEmbedder.load(choose_clip("tiny-random", None, False))


def _vectors(values):
    return np.array(values, dtype=np.float32)


def test_tiny_random_clip_is_deterministic_and_unit_length(embedder, photos_dir):
    image = ImageOps.exif_transpose(Image.open(photos_dir / "truck.jpg"))
    a = embedder.embed_images([image])
    b = ClipEmbedder.load(choose_clip("tiny-random", None, False)).embed_images([image])
    assert np.array_equal(a, b) and a.shape == (1, 32)
    phrases = embedder.embed_phrases(["truck", "pickup truck"])
    assert np.allclose(np.linalg.norm(phrases, axis=1), 1.0, atol=1e-5) and np.allclose(np.linalg.norm(a), 1.0, atol=1e-5)


def test_clip_weights_from_a_local_file_load_without_asking_the_hub(embedder, tmp_path, monkeypatch, photos_dir):
    """A weights file and CLIP's own tokenizer need nothing from the hub: no actor waits on a hub probe."""
    weights = tmp_path / "tiny-clip.pt"
    torch.save(embedder.model.state_dict(), weights)
    probes = []
    monkeypatch.setattr("sam3_engine.models.clip.hub_unreachable", lambda: probes.append("probe") or True)
    choice = choose_clip(TINY_RANDOM_ARCHITECTURE, str(weights), False)
    loaded = ClipEmbedder.load(choice, "cpu")
    image = ImageOps.exif_transpose(Image.open(photos_dir / "truck.jpg"))
    assert not choice.random_weights and probes == []
    assert np.allclose(loaded.embed_images([image]), embedder.embed_images([image]), atol=1e-6)


def test_unreachable_clip_weights_fail_with_advice_unless_fallback(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="clip.model: tiny-random"):
        choose_clip("ViT-B-32", "laion2b_s34b_b79k", False)
    with pytest.raises(ModelLoadError, match="unknown pretrained tag"):
        choose_clip("ViT-B-32", "no-such-tag", False)
    fallback = choose_clip("ViT-B-32", "laion2b_s34b_b79k", True)
    assert fallback.random_weights and "not reachable" in fallback.fallback_reason


@pytest.fixture(scope="module")
def clip_run(ray_cluster, tmp_path_factory):
    """The manifest's photos through every CLIP stage, shared by the module: read-only (copy it to change it)."""
    run_dir = tmp_path_factory.mktemp("clip") / "run"
    config = load_config(
        None,
        {"input": str(EXAMPLES / "manifest.jsonl"), "output": str(run_dir), "stages": "ingest,mine,embed,retrieve,negatives", **SETTINGS},
    )
    return run_dir, run_pipeline(config)


def test_every_image_and_concept_is_embedded_as_the_model_embeds_it(clip_run, embedder):
    run_dir, _ = clip_run
    images = rows(run_dir, "SELECT i.uri, e.embedding, e.model FROM image_embeddings e JOIN images i USING (image_id)")
    assert len(images) == 3 and {r["model"] for r in images} == {"tiny-random"}
    for r in images:
        direct = embedder.embed_images([ImageOps.exif_transpose(Image.open(r["uri"]))])[0]
        assert np.allclose(_vectors(r["embedding"]), direct, atol=1e-5)
    counts = rows(run_dir, "SELECT (SELECT count(*) FROM concepts) AS concepts, (SELECT count(*) FROM phrase_embeddings) AS phrases")[0]
    assert counts["concepts"] == counts["phrases"] > 1203
    (car,) = rows(run_dir, "SELECT embedding FROM phrase_embeddings WHERE phrase = 'car'")
    assert np.allclose(_vectors(car["embedding"]), embedder.embed_phrases(["car"])[0], atol=1e-5)


def test_retrieval_takes_the_top_k_concepts_by_similarity(clip_run):
    run_dir, result = clip_run
    phrases = rows(run_dir, "SELECT concept_id, embedding FROM phrase_embeddings ORDER BY concept_id")
    matrix = _vectors([p["embedding"] for p in phrases])
    for image in rows(run_dir, "SELECT image_id, embedding FROM image_embeddings"):
        similarity = matrix @ _vectors(image["embedding"])
        expected = [phrases[i]["concept_id"] for i in np.argsort(-similarity, kind="stable")[:4] if similarity[i] >= 0.0]
        got = rows(
            run_dir,
            "SELECT concept_id, score FROM candidates WHERE origin = 'clip' AND image_id = $i ORDER BY score DESC",
            {"i": image["image_id"]},
        )
        assert [g["concept_id"] for g in got] == expected
        assert all(abs(g["score"] - similarity[[p["concept_id"] for p in phrases].index(g["concept_id"])]) < 1e-5 for g in got)
    assert result.stages[3].counts["pairs"] == 3 * 4


def test_hard_negatives_drop_concepts_the_image_scores_high_on(clip_run):
    run_dir, _ = clip_run
    ontology = Ontology.load("builtin")
    vectors = {p["phrase"]: _vectors(p["embedding"]) for p in rows(run_dir, "SELECT phrase, embedding FROM phrase_embeddings")}
    images = {r["image_id"]: _vectors(r["embedding"]) for r in rows(run_dir, "SELECT image_id, embedding FROM image_embeddings")}
    present: dict = {}
    for c in rows(run_dir, "SELECT image_id, phrase FROM candidates WHERE origin <> 'hard_negative'"):
        present.setdefault(c["image_id"], set()).add(c["phrase"])
    negatives = rows(
        run_dir,
        "SELECT c.image_id, c.phrase, c.relation, r.phrase AS related FROM candidates c JOIN concepts "
        "r ON r.concept_id = c.related_concept_id WHERE origin = 'hard_negative'",
    )
    assert {n["relation"] for n in negatives} == {"sibling", "cousin", "clip_neighbour"}
    dropped = 0
    for image_id, here in present.items():
        chosen = {n["phrase"] for n in negatives if n["image_id"] == image_id}
        for name in here:
            for other, _ in ontology.relatives(name):
                if other not in here and other not in chosen and float(vectors[other] @ images[image_id]) > 0.1:
                    dropped += 1
    assert dropped > 0, "the similarity filter must have dropped some relatives"
    for n in negatives:
        assert float(vectors[n["phrase"]] @ images[n["image_id"]]) <= 0.1
        assert n["phrase"] not in present[n["image_id"]] and n["related"] in present[n["image_id"]]
        if n["relation"] == "clip_neighbour":
            similarity = {p: float(v @ vectors[n["related"]]) for p, v in vectors.items() if p != n["related"]}
            assert similarity[n["phrase"]] >= sorted(similarity.values())[-5] - 1e-6


def test_a_rerun_embeds_nothing_again(clip_run, tmp_path):
    run_dir = tmp_path / "run"  # a run of its own: the module's run stays as its other tests read it
    shutil.copytree(clip_run[0], run_dir)
    config = load_config(None, {"output": str(run_dir), "stages": "embed,retrieve,negatives", **SETTINGS})
    again = run_pipeline(config)
    assert all(s.units_committed == 0 and s.units_skipped == s.units_total > 0 for s in again.stages)
    assert (
        json.loads(rows(run_dir, "SELECT summary_json FROM runs ORDER BY started_at DESC LIMIT 1")[0]["summary_json"])["stages"][0]["name"]
        == "embed"
    )
