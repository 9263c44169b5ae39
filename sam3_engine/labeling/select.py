"""Choosing what people should review: filters in SQL, then a weighted greedy choice of whole images.

In the style of LightlyOne's selection: ``selection_candidates.sql`` drops what a person has labelled or
another selection has sent out and scores every remaining pair per strategy. Here the scores are weighted
into one, an image is worth its most doubtful pair, and images are taken greedily until the budget of
pairs is spent. With a ``diversity`` weight, each step also rewards an image far (in CLIP embedding space)
from those already chosen or labelled: k-center greedy (Sener & Savarese 2018) over the best candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sam3_engine.engine.catalog import connect, named_query
from sam3_engine.engine.config import MaskThresholds, PairThresholds
from sam3_engine.engine.store import TableStore
from sam3_engine.schemas.tables import SELECTIONS

PAIR_STRATEGIES = ("uncertainty", "disagreement", "coverage", "random")
"""Strategies that score pairs (columns of ``selection_candidates``)."""
STRATEGIES = (*PAIR_STRATEGIES, "diversity")
DEFAULT_WEIGHTS = {"uncertainty": 1.0, "disagreement": 1.0, "coverage": 0.5, "diversity": 0.5}
DIVERSITY_POOL = 20
"""Diversity looks at the best ``DIVERSITY_POOL`` x budget candidate images, not all: the greedy's cost stays bounded."""


class SelectionError(ValueError):
    """A selection that cannot be made as asked (an unknown strategy, a bad weight, no embeddings for diversity)."""


@dataclass
class Selection:
    rows: pa.Table
    candidates: int
    """Pairs that could have been chosen (not labelled, not out for review elsewhere)."""
    images: int
    by_strategy: dict[str, int] = field(default_factory=dict)


def parse_strategies(specs: list[str] | None) -> dict[str, float]:
    """``["uncertainty=2", "diversity"]`` -> weights; none given: the defaults."""
    if not specs:
        return dict(DEFAULT_WEIGHTS)
    weights = {}
    for spec in specs:
        name, _, weight = spec.partition("=")
        if name not in STRATEGIES:
            raise SelectionError(f"unknown strategy {name!r}; strategies: {', '.join(STRATEGIES)}")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise SelectionError(f"strategy {name!r}: weight {weight!r} is not a number") from None
        if not np.isfinite(weights[name]) or weights[name] < 0:
            raise SelectionError(f"strategy {name!r}: weight must be a finite number >= 0, not {weight}")
    if not any(weights.values()):
        raise SelectionError("every strategy has weight 0: nothing to choose by")
    return weights


def select(
    store: TableStore,
    name: str,
    budget: int,
    weights: dict[str, float],
    max_pairs_per_image: int = 10,
    min_positives: int = 10,
    human_verifiers: tuple[str, ...] = ("human", "label-studio", "cvat"),
    seed: int = 0,
    presence_margin: float = 0.2,
) -> Selection:
    """Choose at most ``budget`` pairs, whole images at a time, and write them as selection ``name`` (one commit)."""
    pair_thresholds, mask_thresholds = PairThresholds(), MaskThresholds()
    params = {
        "selection": name,
        "human_verifiers": list(human_verifiers),
        "present_threshold": pair_thresholds.present_threshold,
        "absent_threshold": pair_thresholds.absent_threshold,
        "presence_margin": presence_margin,
        "min_stability": mask_thresholds.min_stability,
        "min_reprompt_iou": mask_thresholds.min_reprompt_iou,
        "min_positives": min_positives,
        "seed": str(seed),
    }
    con = connect(store)
    try:
        candidates = con.sql(named_query("selection_candidates"), params=params).to_arrow_table()
        chosen, strategy, score, images = _choose(con, candidates, budget, weights, max_pairs_per_image, human_verifiers, name)
    finally:
        con.close()
    picked = candidates.take(pa.array(chosen, pa.int64()))
    rows = pa.table(
        {
            "selection": pa.array([name] * len(chosen), pa.string()),
            "pair_id": picked["pair_id"],
            "image_id": picked["image_id"],
            "concept_id": picked["concept_id"],
            "phrase": picked["phrase"],
            "rank": pa.array(range(1, len(chosen) + 1), pa.int32()),
            "strategy": pa.array(strategy, pa.string()),
            "score": pa.array(score, pa.float64()),
            "created_at": pa.array([datetime.now(UTC)] * len(chosen), pa.timestamp("us", tz="UTC")),
        }
    )
    store.replace(SELECTIONS, name, rows)
    counts = pc.value_counts(rows["strategy"]).to_pylist() if rows.num_rows else []
    return Selection(rows, candidates.num_rows, images, {c["values"]: c["counts"] for c in counts})


def _choose(con, candidates: pa.Table, budget: int, weights, max_pairs_per_image, human_verifiers, name):
    """Indices into ``candidates`` in selection order, each pair's leading strategy and score, and the image count."""
    pair_weights = {s: weights.get(s, 0.0) for s in PAIR_STRATEGIES}
    total = sum(pair_weights.values())
    n = candidates.num_rows
    if n == 0 or budget <= 0:
        return [], [], [], 0
    contributions = np.stack([candidates[s].to_numpy(zero_copy_only=False) * w for s, w in pair_weights.items()], axis=1)
    scores = contributions.sum(axis=1) / total if total else np.zeros(n)
    leading = np.array(PAIR_STRATEGIES)[contributions.argmax(axis=1)] if total else np.full(n, "diversity")

    image_ids = candidates["image_id"].to_numpy(zero_copy_only=False)
    order = np.lexsort((candidates["pair_id"].to_numpy(zero_copy_only=False), -scores, image_ids))  # by image, best pair first
    images, starts = np.unique(image_ids[order], return_index=True)
    groups = [order[start:end][:max_pairs_per_image] for start, end in zip(starts, [*starts[1:], n], strict=True)]
    value = np.array([scores[group[0]] + 1e-6 * scores[group].sum() for group in groups])

    ranked = np.lexsort((images, -value))
    if weights.get("diversity", 0.0) > 0:
        ranked = _k_center(con, images, value, ranked, budget, weights, human_verifiers, name)
    chosen = []
    for image in ranked:
        room = budget - len(chosen)
        if room <= 0:
            break
        chosen.extend(groups[image][:room].tolist())
    taken_images = len({image_ids[i] for i in chosen})
    strategy = [str(leading[i]) if total else "diversity" for i in chosen]
    return chosen, strategy, [float(scores[i]) for i in chosen], taken_images


def _k_center(con, images, value, ranked, budget, weights, human_verifiers, name) -> list[int]:
    """Image order by k-center greedy: each step takes the image with the best mix of value and distance to the chosen."""
    pool = ranked[: DIVERSITY_POOL * budget]
    wanted = pa.table({"image_id": pa.array(images[pool], pa.string())})
    con.register("wanted", wanted)
    found = con.sql("SELECT image_id, embedding FROM image_embeddings JOIN wanted USING (image_id) ORDER BY image_id").to_arrow_table()
    if found.num_rows == 0:
        raise SelectionError("the diversity strategy needs CLIP image embeddings: run the embed stage, or drop diversity")
    anchors = con.sql(
        named_query("selection_anchors"), params={"human_verifiers": list(human_verifiers), "selection": name}
    ).to_arrow_table()
    position = {image_id: i for i, image_id in enumerate(images)}
    members = np.array([position[i] for i in found["image_id"].to_pylist()])
    vectors = np.array(found["embedding"].to_pylist(), np.float32)
    distance = np.full(len(members), 2.0, np.float32)  # cosine distance of unit vectors is at most 2
    if anchors.num_rows:
        anchor_vectors = np.array(anchors["embedding"].to_pylist(), np.float32)
        for start in range(0, len(anchor_vectors), 1024):
            distance = np.minimum(distance, (1.0 - vectors @ anchor_vectors[start : start + 1024].T).min(axis=1))
    diversity = weights["diversity"]
    pair_weight = sum(weights.get(s, 0.0) for s in PAIR_STRATEGIES)
    mix_value = pair_weight / (pair_weight + diversity)
    member_value = value[members]
    top = member_value.max() or 1.0
    order, remaining = [], np.ones(len(members), bool)
    while remaining.any() and len(order) < budget:
        objective = mix_value * member_value / top + (1 - mix_value) * distance / 2.0
        objective[~remaining] = -np.inf
        best = int(objective.argmax())
        order.append(members[best])
        remaining[best] = False
        distance = np.minimum(distance, 1.0 - vectors @ vectors[best])
    chosen = set(order)
    return order + [i for i in ranked if i not in chosen]
