"""Human labels as a verifier: a label file becomes verdict rows of a human verifier.

Entry point: ``import_labels``. The file is the one ``calibrate`` reads (``pair_id`` with
``present`` / ``exhaustive``, ``mask_id`` with ``good``). Its rows go to ``pair_verifications`` and
``mask_verifications`` under the verifier's name (``human`` by default, one of
``splits.human_verifiers``), replacing that verifier's earlier import in one commit per table, so
splits can make human-confirmed pairs Gold and calibration can score machines against them. The
import is recorded in the units ledger as stage ``labels.<verifier>``, so the next splits run sees
upstream work change and rebuilds.
"""

from __future__ import annotations

import uuid
from collections import Counter

import pyarrow as pa

from sam3_engine.app.calibration import label_counts, normalised_labels
from sam3_engine.engine.catalog import connect, named_query
from sam3_engine.engine.stage import fingerprint, stage_class, stage_names
from sam3_engine.engine.store import TableStore
from sam3_engine.schemas.tables import MASK_VERIFICATIONS, PAIR_VERIFICATIONS, UNITS, validate
from sam3_engine.stages.verifier import VerifierStage


def import_labels(store: TableStore, labels: pa.Table, verifier: str) -> dict[str, int]:
    """Write ``labels`` as ``verifier``'s verdicts; returns the labels matched and not matched."""
    machine = _machine_ledgers(store, verifier)
    if machine:
        raise ValueError(
            f"--verifier {verifier!r} is a machine verifier of this run (stage {machine[0].split('.')[0]} wrote its verdicts): "
            "importing would replace them; give people's labels a name of their own, such as human"
        )
    labels = normalised_labels(labels)
    for key in ("pair_id", "mask_id"):
        repeated = sorted(i for i, n in Counter(labels.column(key).drop_null().to_pylist()).items() if n > 1)
        if repeated:
            raise ValueError(f"labels give {key} {repeated[:3]} more than once: one label per {key.removesuffix('_id')}")
    con = connect(store)
    try:
        con.register("labels", labels)
        masks = con.sql(named_query("human_mask_verdicts"), params={"verifier": verifier}).to_arrow_table()
        pairs = con.sql(named_query("human_pair_verdicts"), params={"verifier": verifier}).to_arrow_table()
    finally:
        con.close()
    written_masks = store.replace(MASK_VERIFICATIONS, verifier, validate(MASK_VERIFICATIONS, masks))
    written_pairs = store.replace(PAIR_VERIFICATIONS, verifier, validate(PAIR_VERIFICATIONS, pairs))
    ledger = f"labels.{verifier}"
    unit_id = fingerprint(ledger, {"labels": labels.to_pylist()})
    store.delete_units(UNITS, store.done_units(ledger) - {unit_id})
    store.record_unit(
        ledger,
        unit_id,
        f"import-labels-{uuid.uuid4().hex}",
        labels.num_rows,
        {MASK_VERIFICATIONS.name: written_masks, PAIR_VERIFICATIONS.name: written_pairs},
    )
    given = label_counts(labels)
    return {"pairs": written_pairs, "masks": written_masks, "unmatched": given["pairs"] + given["masks"] - written_pairs - written_masks}


def _machine_ledgers(store: TableStore, verifier: str) -> list[str]:
    """The ledgers of verifier stages that wrote verdicts under ``verifier``: verdicts are replaced per name, so an import
    under a machine's name would silently take the place of its verdicts (and re-running the stage would not restore them)."""
    ledgers = store.ledger()
    candidates = (f"{name}.{verifier}" for name in stage_names() if issubclass(stage_class(name), VerifierStage))
    return [ledger for ledger in candidates if ledger in ledgers]
