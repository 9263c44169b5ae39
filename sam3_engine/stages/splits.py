"""Splits: each verified pair's tier (Gold, Silver, or excluded with a reason) and its split.

Entry point: ``SplitsStage``. Set logic over the verification tables, in one SQL file
(``schemas/sql/splits.sql``) run by DuckDB and written whole as the ``splits`` table; the stage has
no work units. Train/val/test is dealt per near-duplicate group (``near_duplicates``, from the dedup
stage; without it, per image) from a hash of the group's id, so neither an image nor a near-duplicate
of it sits in two splits, and the deal is stable as the corpus grows.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from sam3_engine.engine.catalog import connect, named_query
from sam3_engine.engine.config import ConfigSection
from sam3_engine.engine.stage import BuildContext, Derivation, Stage, WorkUnit, fingerprint, register_stage
from sam3_engine.schemas.tables import SPLITS

VERSION = 3
"""Bump when a change to this module or its SQL changes the rows it writes.
2: the table's ledger is ``splits.splits`` (was the stage's own, so every run removed and rebuilt it).
3: splits are dealt per near-duplicate group (``near_duplicates.group_id``), not per image."""


class SplitsConfig(ConfigSection):
    """Who may confirm a pair, how many must agree for Gold, and how images are dealt to train/val/test."""

    verifiers: tuple[str, ...] = Field((), description="Verifiers whose verdicts count as sources; empty: every verifier in the run.")
    human_verifiers: tuple[str, ...] = Field(
        ("human", "label-studio", "cvat"),
        description="Verifiers that are human labels (import-labels' default name, and labeling pull's tools): one of them confirming "
        "a pair makes it Gold, and it overrides machines.",
    )
    gold_min_sources: int = Field(2, ge=1, description="Independent machine verifiers that must agree for Gold.")
    max_negatives_per_image: int = Field(30, ge=0, description="At most this many negative pairs per image, hard negatives first.")
    train_fraction: float = Field(
        0.8, ge=0.0, le=1.0, description="Share of near-duplicate groups (images, without dedup), not pairs, in train."
    )
    val_fraction: float = Field(0.1, ge=0.0, le=1.0, description="Share of groups in val; test takes the rest.")
    salt: str = Field(
        "sam3-engine",
        description="Mixed into the hash of each near-duplicate group's id (an image's own without dedup) that picks its split: "
        "change it for another deal.",
    )

    @model_validator(mode="after")
    def _fractions(self) -> SplitsConfig:
        if self.train_fraction + self.val_fraction > 1.0:
            raise ValueError(f"train_fraction + val_fraction ({self.train_fraction} + {self.val_fraction}) exceeds 1")
        return self


@register_stage
class SplitsStage(Stage):
    name = "splits"
    order = 80
    config_model = SplitsConfig
    outputs = ()
    derived = (SPLITS,)

    @classmethod
    def build(cls, context: BuildContext) -> SplitsStage:
        return cls(context.config.splits)

    def __init__(self, config: SplitsConfig):
        self.config = config

    def plan(self, store) -> list[WorkUnit]:
        return []

    def process(self, unit: WorkUnit, prepared: Any = None):
        raise NotImplementedError("the splits stage has no work units")

    def derive(self, store, done_units: list[str]) -> list[Derivation]:
        """The ``splits`` table, rebuilt when the config or any upstream unit changes."""
        ledger = f"{self.name}.{SPLITS.name}"
        con = connect(store)
        ((upstream,),) = con.sql(
            "SELECT md5(coalesce(string_agg(unit_id, ',' ORDER BY unit_id), '')) FROM units WHERE stage <> $ledger",
            params={"ledger": ledger},
        ).fetchall()
        unit_id = fingerprint(ledger, {"version": VERSION, "config": self.config.model_dump(mode="json"), "upstream": upstream})
        params = {
            "verifiers": list(self.config.verifiers),
            "human": list(self.config.human_verifiers),
            "gold_min_sources": self.config.gold_min_sources,
            "max_negatives": self.config.max_negatives_per_image,
            "train": self.config.train_fraction,
            "val": self.config.val_fraction,
            "salt": self.config.salt,
            "unit_id": unit_id,
        }
        return [Derivation(unit_id, SPLITS, con.sql(named_query("splits"), params=params).to_arrow_reader())]

    def summarize(self, con) -> dict[str, Any]:
        tiers = dict(con.execute("SELECT tier || coalesce('_' || kind, ''), count(*) FROM splits GROUP BY ALL ORDER BY ALL").fetchall())
        splits = dict(con.execute("SELECT split, count(*) FROM splits WHERE tier <> 'excluded' GROUP BY ALL ORDER BY ALL").fetchall())
        excluded = dict(con.execute("SELECT reason, count(*) FROM splits WHERE tier = 'excluded' GROUP BY ALL ORDER BY ALL").fetchall())
        ((leaks,),) = con.execute(
            "SELECT count(*) FROM (SELECT image_id FROM splits GROUP BY image_id HAVING count(DISTINCT split) > 1)"
        ).fetchall()
        ((group_leaks,),) = con.execute(
            "SELECT count(*) FROM (SELECT group_id FROM splits JOIN near_duplicates USING (image_id) "
            "GROUP BY group_id HAVING count(DISTINCT split) > 1)"
        ).fetchall()
        balance = con.sql(
            "SELECT phrase, sum(train_positive) AS train, sum(val_positive) AS val, "
            f"sum(test_positive) AS test FROM ({named_query('split_balance')}) GROUP BY phrase"
        ).fetchall()
        ((random_gold,),) = con.execute(
            "SELECT count(DISTINCT s.pair_id) FROM splits AS s JOIN pair_verifications AS v ON v.pair_id = s.pair_id "
            "AND list_contains(s.sources, v.verifier) WHERE s.tier = 'gold' AND v.verifier_version LIKE '%tiny-random%'"
        ).fetchall()
        counts = {
            "pairs": sum(tiers.values()),
            "tiers": tiers,
            "pairs_per_split": splits,
            "excluded": excluded,
            "images_in_two_splits": leaks,
            "groups_in_two_splits": group_leaks,
            "concepts_with_positives": sum(1 for _, train, val, test in balance if train + val + test),
            "concepts_missing_from_val_or_test": sum(1 for _, train, val, test in balance if train and not (val and test)),
        }
        if random_gold:  # Gold is only as good as its sources: say so where a source had random weights
            counts["gold_from_random_weights"] = random_gold
        return counts
