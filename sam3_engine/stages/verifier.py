"""The family base of verifiers: stages that score SAM 3's proposals with a model and derive verdicts in SQL.

What every verifier shares is written once here: its work (each image with proposals, re-verified
when its proposals change), its own ledger (a second verifier leaves the first's rows in place),
and its verdicts: a mask macro, then a pair macro over the mask verdicts, at the config's
thresholds, materialised under the verifier's name in ``mask_verifications`` and
``pair_verifications``. A threshold change re-derives them from the stored scores; no model loads.
A subclass says which model it runs, what it scores, and which macros judge its scores.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa

from sam3_engine.engine.catalog import connect, named_query
from sam3_engine.engine.config import VERDICT_THRESHOLDS, ConfigError
from sam3_engine.engine.stage import (
    BuildContext,
    Derivation,
    WorkUnit,
    arrow_rows,
    fingerprint,
    plan_units,
    reject_reasons,
    stage_class,
    stage_names,
)
from sam3_engine.engine.store import TableStore
from sam3_engine.schemas.tables import MASK_VERIFICATIONS, PAIR_VERIFICATIONS, TableSpec
from sam3_engine.stages.image_model import ImageModelStage


@dataclass(frozen=True)
class ImageTask:
    image_id: str
    uri: str
    proposals: str
    """A digest of the proposal units that wrote the image's pairs: part of the unit's id."""


def rows_by_image(store: TableStore, name: str, image_ids: list[str], columns: list[str], order: str) -> dict[str, list[dict[str, Any]]]:
    """The rows of ``name`` for these images, per image, sorted by ``order`` (a deterministic order whatever the file layout)."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in store.read_images(name, image_ids, columns).sort_by(order).to_pylist():
        grouped.setdefault(row["image_id"], []).append(row)
    return grouped


class VerifierStage(ImageModelStage):
    """A verifier. Its config has ``verifier`` (the name on its rows), ``unit_size``, and ``thresholds()``: those of its two macros."""

    derived = (MASK_VERIFICATIONS, PAIR_VERIFICATIONS)
    version: ClassVar[int]
    """The module's VERSION: bumped when its scores change, so that every unit re-runs."""
    mask_macro: ClassVar[str]
    pair_macro: ClassVar[str]
    """The SQL macros (``schemas/sql/verdicts.sql``) that judge its scores; their thresholds are declared in VERDICT_THRESHOLDS."""
    pair_scores: ClassVar[TableSpec]
    mask_scores: ClassVar[TableSpec]
    config: Any

    @classmethod
    def check_verifier_name(cls, context: BuildContext) -> None:
        """A verifier's name is its own: verdicts are replaced per name, and splits counts each name as one source (or as
        people, for ``splits.human_verifiers``), so a shared name would overwrite another's verdicts or pass for a person."""
        name = getattr(context.config, cls.name).verifier
        for other in stage_names():
            if other != cls.name and issubclass(stage_class(other), VerifierStage) and getattr(context.config, other).verifier == name:
                raise ConfigError(
                    f"{cls.name}.verifier: {name!r} is also {other}.verifier; each verifier needs a name of its own, "
                    "or its verdicts replace the other's"
                )
        if name in context.config.splits.human_verifiers:
            raise ConfigError(
                f"{cls.name}.verifier: {name!r} is one of splits.human_verifiers; a machine's verdicts would count as people's"
            )

    @property
    def ledger(self) -> str:
        """One ledger per verifier: a second verifier's run leaves the first's scores and verdicts in place."""
        return f"{self.name}.{self.config.verifier}"

    def plan_images(self, store, settings: dict[str, Any]) -> Iterator[WorkUnit]:
        """One item per image with proposals; a unit's id covers its images' proposal units, so new proposals re-verify."""
        con = connect(store)
        inputs = con.sql(named_query("verify_inputs")).to_arrow_table()
        con.close()
        tasks = (ImageTask(**row) for row in arrow_rows(inputs))
        settings = {**settings, "version": self.version, "verifier": self.config.verifier}
        yield from plan_units(
            self.ledger, settings, tasks, lambda t: t.image_id, self.config.unit_size, lambda t: (t.image_id, t.proposals)
        )

    def derive(self, store, done_units: list[str]) -> list[Derivation]:
        """Mask then pair verdicts at the config's thresholds, from the stored scores (SQL macros, no model)."""
        thresholds = self.config.thresholds()
        payload = {"version": self.version, "verifier": self.config.verifier, "thresholds": thresholds, "units": done_units}
        con = connect(store)
        try:
            mask_sql, mask_params = self._at_thresholds(self.mask_macro, thresholds)
            con.execute(f"CREATE TEMP TABLE current_mask_verdicts AS {mask_sql}", mask_params)
            masks = con.sql("SELECT * FROM current_mask_verdicts").to_arrow_table()
            pair_sql, pair_params = self._at_thresholds(self.pair_macro, thresholds, "mask_table := 'current_mask_verdicts'")
            pairs = con.sql(pair_sql, params=pair_params).to_arrow_table()
        finally:
            con.close()
        key = self.config.verifier
        return [
            Derivation(fingerprint(f"{self.ledger}.masks", payload), MASK_VERIFICATIONS, _reader(MASK_VERIFICATIONS, masks), key=key),
            Derivation(fingerprint(f"{self.ledger}.pairs", payload), PAIR_VERIFICATIONS, _reader(PAIR_VERIFICATIONS, pairs), key=key),
        ]

    def _at_thresholds(self, macro: str, thresholds: dict[str, Any], *arguments: str) -> tuple[str, dict[str, Any]]:
        """(SQL, parameters) of ``macro`` with each threshold declared for it bound, and all of them as JSON: built from the
        declaration, so that a threshold added there reaches the stored verdicts."""
        params = {"verifier_name": self.config.verifier, **{name: thresholds[name] for name in VERDICT_THRESHOLDS[macro].model_fields}}
        call = ", ".join([*arguments, *(f"{name} := ${name}" for name in params)])
        return f"SELECT *, $thresholds AS thresholds FROM {macro}({call})", {**params, "thresholds": json.dumps(thresholds, sort_keys=True)}

    def summarize(self, con) -> dict[str, Any]:
        verifier = {"verifier": self.config.verifier}
        images, pairs, masks = con.execute(
            f"SELECT (SELECT count(DISTINCT image_id) FROM {self.pair_scores.name} WHERE verifier = $verifier), "
            f"(SELECT count(*) FROM {self.pair_scores.name} WHERE verifier = $verifier), "
            f"(SELECT count(*) FROM {self.mask_scores.name} WHERE verifier = $verifier)",
            verifier,
        ).fetchone()
        reasons = reject_reasons(con, self)

        def tally(sql: str) -> dict[str, int]:
            return dict(con.execute(sql, verifier).fetchall())

        counts = {
            "accounted": images + sum(reasons.values()),
            "verifier": self.config.verifier,
            "pairs": pairs,
            "masks": masks,
            "mask_verdicts": tally("SELECT verdict, count(*) FROM mask_verifications WHERE verifier = $verifier GROUP BY ALL ORDER BY ALL"),
            "mask_reasons": tally(
                "SELECT reason, count(*) FROM (SELECT unnest(reasons) AS reason FROM "
                "mask_verifications WHERE verifier = $verifier) GROUP BY ALL ORDER BY ALL"
            ),
            "presence": tally("SELECT presence, count(*) FROM pair_verifications WHERE verifier = $verifier GROUP BY ALL ORDER BY ALL"),
            "exhaustivity": tally(
                "SELECT exhaustivity, count(*) FROM pair_verifications WHERE verifier = $verifier GROUP BY ALL ORDER BY ALL"
            ),
            "rejects": sum(reasons.values()),
            "reject_reasons": reasons,
            "model": self.choice.label,
        }
        if self.choice.random_weights:
            counts["random_weights"] = True
        return counts


def _reader(spec: TableSpec, table: pa.Table) -> pa.RecordBatchReader:
    return pa.RecordBatchReader.from_batches(spec.schema, table.cast(spec.schema).to_batches())
