"""The coverage report: one self-contained HTML file from a run's own tables.

Every figure is a named query of ``schemas/sql`` run by DuckDB over the Delta tables, so
``sam3-engine query`` reproduces it. The file works with no network: Plotly's script is inlined
once. Phrases come from untrusted text (captions, manifests): every value is escaped, in tables
and in plot labels alike.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import duckdb
import plotly.graph_objects as go
import pyarrow as pa
from plotly.offline import get_plotlyjs

from sam3_engine.dashboards.gallery import build_tiles, render_gallery
from sam3_engine.engine.catalog import connect, named_query
from sam3_engine.engine.config import StorageConfig
from sam3_engine.engine.store import TableStore
from sam3_engine.stages.splits import SplitsConfig

PEOPLE = SplitsConfig.model_fields["human_verifiers"].default
"""Verifiers that are people, as ``splits`` counts them by default: the loop section measures the machines against them."""

NEEDED = {
    "candidates": "mine",
    "pairs": "propose",
    "pair_verifications": "verify",
    "mask_verifications": "verify",
    "splits": "splits",
}
"""Tables the report reads, and the stage that writes each: a table not yet written is named as missing."""

COVERAGE_COLUMNS = (
    ("phrase", "concept"),
    ("parent", "parent"),
    ("images", "images asked"),
    ("caption_images", "caption"),
    ("user_images", "user"),
    ("vocabulary_images", "vocabulary"),
    ("clip_images", "clip"),
    ("hard_negative_images", "hard negative"),
    ("pairs", "pairs"),
    ("present_pairs", "present"),
    ("absent_pairs", "absent"),
    ("uncertain_pairs", "uncertain"),
    ("masks", "masks"),
    ("accepted_masks", "accepted"),
    ("uncertain_masks", "uncertain masks"),
    ("rejected_masks", "rejected"),
    ("gold_positives", "gold +"),
    ("gold_negatives", "gold -"),
    ("silver_positives", "silver +"),
    ("silver_negatives", "silver -"),
    ("mean_presence_probability", "mean presence"),
    ("mean_mask_score", "mean mask score"),
)
"""The coverage table's columns (query column, header), in the order shown."""


HEALTH_COLUMNS = (
    ("stage", "ledger"),
    ("units", "units"),
    ("inputs", "inputs"),
    ("rows_written", "rows written"),
    ("worker_crashes", "inputs that crashed workers"),
    ("oom_retries", "OOM retries"),
    ("batch_splits", "batch splits"),
    ("model_seconds", "model s"),
    ("inputs_per_model_second", "inputs per model s"),
    ("peak_rss_mib", "peak RSS MiB"),
    ("peak_gpu_mib", "peak GPU MiB"),
    ("first_commit", "first commit"),
    ("last_commit", "last commit"),
)

SACO_NEGATIVE_SHARE = 0.88
"""Share of negative pairs in SA-Co's benchmark, shown beside the run's."""


@dataclass
class ReportData:
    run_url: str
    coverage: list[dict[str, Any]]
    rejects: list[dict[str, Any]]
    missing: dict[str, str] = field(default_factory=dict)
    """Tables not written yet, with the stage that writes them."""
    min_positives: int = 10
    ontology: dict[str, int] = field(default_factory=dict)
    """The ontology's concepts, how many the run asked about, how many reach ``min_positives``."""
    branches: list[dict[str, Any]] = field(default_factory=list)
    thin: list[dict[str, Any]] = field(default_factory=list)
    health: list[dict[str, Any]] = field(default_factory=list)
    """Per ledger: units, inputs, rows, OOM retries, batch splits, model seconds, peak memory."""
    negatives: dict[str, Any] = field(default_factory=dict)
    """Kept pairs, negatives and hard negatives among them, and their shares."""
    distributions: list[dict[str, Any]] = field(default_factory=list)
    presence: list[dict[str, Any]] = field(default_factory=list)
    mask_reasons: list[dict[str, Any]] = field(default_factory=list)
    fired: list[dict[str, Any]] = field(default_factory=list)
    """Hard negatives on which SAM 3 kept an instance."""
    gallery: str = ""
    """The mask gallery's HTML section (``dashboards.gallery``)."""
    compared_with: str | None = None
    changes: list[dict[str, Any]] = field(default_factory=list)
    """Per concept, this run against ``compared_with`` (``coverage_change``)."""
    near_duplicates: dict[str, Any] = field(default_factory=dict)
    """Images hashed by the dedup stage, near-duplicate groups and their images, the largest group (``near_duplicate_summary``)."""
    duplicate_groups: list[dict[str, Any]] = field(default_factory=list)
    """The near-duplicate groups, largest first (``near_duplicate_groups``)."""
    verifiers: list[str] = field(default_factory=list)
    """Whose verdicts the verdict columns count: ``--verifier``'s, or every verifier's in the run."""
    dedup_ran: bool = False
    """The dedup stage ran (on no image, if ``near_duplicates`` counts none)."""
    loop_rounds: list[dict[str, Any]] = field(default_factory=list)
    """Per selection round: selected, answered, machines against people, Gold gained (``loop_rounds``)."""
    loop_gold: list[dict[str, Any]] = field(default_factory=list)
    """Gold gained from people per round and concept (``loop_gold``)."""


def gather(
    run_url: str,
    storage_config: StorageConfig | None = None,
    verifier: str | None = None,
    min_positives: int = 10,
    gallery_concepts: int = 50,
    gallery_per_concept: int = 0,
) -> ReportData:
    """The report's figures, from the run's tables; tables a stage has not written yet read as empty."""
    store = TableStore(run_url, storage_config)
    con = connect(store)
    try:
        ran = {name for (name,) in con.execute(named_query("stages_run")).fetchall()}
        missing = {table: stage for table, stage in NEEDED.items() if stage not in ran and store.open(table) is None}
        coverage = con.sql(named_query("concept_coverage"), params={"verifier": verifier}).to_arrow_table().to_pylist()
        verifiers = [verifier] if verifier else [row[0] for row in con.execute(named_query("verifiers")).fetchall()]
        rejects = con.sql(named_query("rejects_by_reason")).to_arrow_table().to_pylist()
        goal = {"min_positives": min_positives}
        (ontology,) = con.sql(named_query("ontology_summary"), params=goal).to_arrow_table().to_pylist()
        branches = con.sql(named_query("ontology_coverage"), params=goal).to_arrow_table().to_pylist()
        thin = con.sql(named_query("thin_concepts"), params=goal).to_arrow_table().to_pylist()
        health = con.sql(named_query("run_health")).to_arrow_table().to_pylist()
        (negatives,) = con.sql(named_query("negative_share")).to_arrow_table().to_pylist()
        distributions = con.sql(named_query("distributions")).to_arrow_table().to_pylist()
        presence = con.sql(named_query("presence_histogram"), params={"verifier": verifier}).to_arrow_table().to_pylist()
        mask_reasons = con.sql(named_query("mask_reasons"), params={"verifier": verifier}).to_arrow_table().to_pylist()
        fired = con.sql(named_query("hard_negatives_fired")).to_arrow_table().to_pylist()
        (near_duplicates,) = con.sql(named_query("near_duplicate_summary")).to_arrow_table().to_pylist()
        duplicate_groups = con.sql(named_query("near_duplicate_groups") + " LIMIT $shown", params={"shown": DUPLICATE_GROUPS_SHOWN})
        duplicate_groups = duplicate_groups.to_arrow_table().to_pylist()
        people = {"human_verifiers": list(PEOPLE)}
        loop_rounds = con.sql(named_query("loop_rounds"), params=people).to_arrow_table().to_pylist()
        loop_gold = con.sql(named_query("loop_gold") + " LIMIT $shown", params={**people, "shown": LOOP_GOLD_SHOWN})
        loop_gold = loop_gold.to_arrow_table().to_pylist()
        sample_params = {"concepts": gallery_concepts, "per_concept": gallery_per_concept, "verifier": verifier}
        sample = con.sql(named_query("gallery_sample"), params=sample_params).to_arrow_table().to_pylist() if gallery_per_concept else []
    finally:
        con.close()
    return ReportData(
        run_url=store.run_url,
        coverage=coverage,
        rejects=rejects,
        missing=missing,
        min_positives=min_positives,
        ontology=ontology,
        branches=branches,
        thin=thin,
        health=health,
        negatives=negatives,
        distributions=distributions,
        presence=presence,
        mask_reasons=mask_reasons,
        fired=fired,
        gallery=render_gallery(build_tiles(sample, storage_config)),
        near_duplicates=near_duplicates,
        duplicate_groups=duplicate_groups,
        verifiers=verifiers,
        dedup_ran="dedup" in ran,
        loop_rounds=loop_rounds,
        loop_gold=loop_gold,
    )


def compare(data: ReportData, other_url: str, storage_config: StorageConfig | None = None, verifier: str | None = None) -> None:
    """Fill ``data.changes``: each concept's coverage in this run against ``other_url``'s (the earlier run, say)."""
    other = TableStore(other_url, storage_config)
    other_con = connect(other)
    try:  # only the other run's per-concept coverage: the rest of its report is not shown
        before = other_con.sql(named_query("concept_coverage"), params={"verifier": verifier}).to_arrow_table().to_pylist()
    finally:
        other_con.close()
    schema = _coverage_schema(data.coverage, before)
    con = duckdb.connect()
    try:
        con.register("after_coverage", pa.Table.from_pylist(data.coverage, schema))
        con.register("before_coverage", pa.Table.from_pylist(before, schema))
        data.changes = con.sql(named_query("coverage_change")).to_arrow_table().to_pylist()
    finally:
        con.close()
    data.compared_with = other.run_url


def _coverage_schema(*coverages: list[dict[str, Any]]) -> pa.Schema | None:
    """The concept_coverage columns, typed, even for a run with no concepts (an empty table still needs them)."""
    for coverage in coverages:
        if coverage:
            return pa.Table.from_pylist(coverage[:1]).schema
    return pa.schema(
        [
            (name, pa.string() if name in ("concept_id", "phrase") else pa.int64())
            for name in ("concept_id", "phrase", "verified_positives", "present_pairs", "accepted_masks")
        ]
    )


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, datetime):
        return f"{value:%Y-%m-%d %H:%M:%S}"
    return html.escape(str(value))


def _table(
    rows: list[dict[str, Any]], columns: tuple[tuple[str, str], ...], table_id: str, link: Callable[[dict[str, Any]], str] | None = None
) -> str:
    """An HTML table of ``rows``; with ``link``, each row's first cell links to ``link(row)`` (a URL made from engine values)."""
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td data-column="{key}">'
            + (f'<a href="{html.escape(link(row))}">{_cell(row.get(key))}</a>' if link and index == 0 else _cell(row.get(key)))
            + "</td>"
            for index, (key, _) in enumerate(columns)
        )
        + "</tr>"
        for row in rows
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _plotly_text(text: str) -> str:
    """Text for a Plotly label: Plotly reads labels as a little HTML, and of the entities decodes ``&lt;``, ``&gt;`` and ``&amp;``
    (and numeric ones), not ``&quot;``: so the markup characters are escaped and quotes are left as they are."""
    return html.escape(text, quote=False)


def _long_tail(coverage: list[dict[str, Any]]) -> str:
    """Concepts ranked by verified positives (log scale): where the long tail starts."""
    ranked = sorted(coverage, key=lambda row: (-row["verified_positives"], row["phrase"]))
    without = sum(1 for row in ranked if not row["verified_positives"])
    off_scale = f"<br><sub>{without} of {len(ranked)} concepts have none, below the log scale</sub>" if without else ""
    figure = go.Figure(
        go.Scatter(
            x=list(range(1, len(ranked) + 1)),
            y=[row["verified_positives"] for row in ranked],
            text=[_plotly_text(row["phrase"]) for row in ranked],
            mode="lines+markers",
            hovertemplate="%{text}: %{y} verified positives<extra></extra>",
        )
    )
    figure.update_layout(
        title="Concepts ranked by verified positives (Gold and Silver)" + off_scale,
        xaxis_title="concept rank",
        yaxis_title="verified positives",
        yaxis_type="log",
        height=360,
        margin={"t": 80 if off_scale else 50, "b": 40},  # room for the second title line above the plot
    )
    return figure.to_html(full_html=False, include_plotlyjs=False, div_id="long-tail")


def _presence(coverage: list[dict[str, Any]], top: int = 30) -> str:
    """Pairs by presence verdict for the most asked concepts."""
    shown = sorted(coverage, key=lambda row: (-row["pairs"], row["phrase"]))[:top]
    phrases = [_plotly_text(row["phrase"]) for row in shown]
    verdicts = ("present", "uncertain", "absent")
    figure = go.Figure([go.Bar(name=verdict, x=phrases, y=[row[f"{verdict}_pairs"] for row in shown]) for verdict in verdicts])
    figure.update_layout(barmode="stack", title=f"Pairs by presence verdict (the {top} most asked concepts)", height=380)
    return figure.to_html(full_html=False, include_plotlyjs=False, div_id="presence")


DISTRIBUTIONS = (
    ("concepts_per_image", "Concepts asked per image", "concepts", "images"),
    ("instances_per_pair", "Instances per proposed pair", "instances", "pairs"),
    ("mask_area_log10", "Mask area (log10 of the share of the image)", "log10 area share", "masks"),
)


def _bars(figure_id: str, title: str, x_title: str, y_title: str, x: list, y: list) -> str:
    figure = go.Figure(go.Bar(x=x, y=y))
    figure.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, height=300, margin={"t": 50, "b": 40})
    return figure.to_html(full_html=False, include_plotlyjs=False, div_id=figure_id)


def _distributions_section(data: ReportData) -> str:
    charts = []
    for name, title, x_title, y_title in DISTRIBUTIONS:
        buckets = [row for row in data.distributions if row["figure"] == name]
        if buckets:
            charts.append(_bars(name.replace("_", "-"), title, x_title, y_title, [r["bucket"] for r in buckets], [r["n"] for r in buckets]))
    return f'<section id="distributions"><h2>Distributions</h2>{"".join(charts)}</section>' if charts else ""


def _verification_section(data: ReportData) -> str:
    parts = []
    if data.presence:
        figure = go.Figure(
            [
                go.Bar(name=verdict, x=[r["bucket"] for r in rows], y=[r["pairs"] for r in rows])
                for verdict in ("present", "uncertain", "absent")
                if (rows := [r for r in data.presence if r["presence"] == verdict])
            ]
        )
        figure.update_layout(barmode="stack", title="Presence probability by verdict", xaxis_title="presence probability", height=320)
        parts.append(figure.to_html(full_html=False, include_plotlyjs=False, div_id="presence-histogram"))
    reasons = (("verdict", "verdict"), ("reason", "reason"), ("masks", "masks"))
    fired = (
        ("phrase", "hard negative"),
        ("confused_with", "confused with"),
        ("relation", "relation"),
        ("instance_count", "instances"),
        ("max_score", "max score"),
    )
    parts.append(f"<h3>Mask verdicts by reason</h3>{_table(data.mask_reasons, reasons, 'mask-reasons')}")
    parts.append(f"<h3>Hard negatives SAM 3 fired on ({len(data.fired)})</h3>{_table(data.fired[:100], fired, 'fired')}")
    return f'<section id="verification"><h2>Verification</h2>{"".join(parts)}</section>'


def _changes_section(data: ReportData, shown: int = 100) -> str:
    if data.compared_with is None:
        return ""
    gained = sum(row["positives_change"] > 0 for row in data.changes)
    lost = sum(row["positives_change"] < 0 for row in data.changes)
    before = sum(row["positives_before"] for row in data.changes)
    after = sum(row["positives_after"] for row in data.changes)
    columns = (
        ("phrase", "concept"),
        ("positives_before", "positives before"),
        ("positives_after", "after"),
        ("positives_change", "change"),
        ("present_before", "present before"),
        ("present_after", "after "),
        ("accepted_before", "accepted masks before"),
        ("accepted_after", "after  "),
    )
    changed = [row for row in data.changes if row["positives_change"] or row["present_after"] != row["present_before"]]
    return (
        f'<section id="changes"><h2>Against {html.escape(data.compared_with)}</h2>'
        f"<p>Verified positives {before} before, {after} now: {gained} concepts gained, {lost} lost.</p>"
        f"{_table(changed[:shown], columns, 'coverage-change')}</section>"
    )


def _negatives_paragraph(negatives: dict[str, Any]) -> str:
    if not negatives.get("kept_pairs"):
        return ""
    hard = negatives["hard_negative_share"] or 0.0
    return (
        f'<p id="negatives">{negatives["kept_pairs"]} pairs kept (Gold and Silver): {negatives["negative_share"]:.1%} negatives '
        f"(SA-Co's benchmark: about {SACO_NEGATIVE_SHARE:.0%}), {hard:.1%} of them hard negatives.</p>"
    )


DUPLICATE_GROUPS_SHOWN = 20
"""The largest near-duplicate groups the report lists."""


def _near_duplicates_section(data: ReportData) -> str:
    """How many near-duplicate groups the splits dealt whole, and the largest of them."""
    counts = data.near_duplicates
    if not counts.get("images") and data.dedup_ran:
        return '<section id="near-duplicates"><h2>Near-duplicates</h2><p>The dedup stage has hashed no image yet.</p></section>'
    if not counts.get("images"):
        return (
            '<section id="near-duplicates"><h2>Near-duplicates</h2><p>The dedup stage has not run: splits are dealt per image, '
            "so near-duplicates (a photo resized, re-encoded, cropped or mirrored) may sit in two splits.</p></section>"
        )
    columns = (
        ("group_id", "group"),
        ("images", "images"),
        ("linked_by", "linked by"),
        ("min_phash_distance", "closest pHash (bits)"),
        ("max_clip_cosine", "closest CLIP"),
        ("splits", "splits"),
        ("first_uris", "first images"),
    )
    shown = min(len(data.duplicate_groups), counts["groups"])
    return (
        f'<section id="near-duplicates"><h2>Near-duplicates</h2><p>{counts["images"]} images hashed: {counts["groups"]} groups of '
        f"near-duplicates hold {counts['images_in_groups']} of them (the largest {counts['largest_group']}); splits deal each group "
        f"whole, {counts['groups_in_two_splits']} groups sit in two splits.</p>"
        f"<h3>The largest groups (the first {shown})</h3>{_table(data.duplicate_groups, columns, 'near-duplicate-groups')}</section>"
    )


def _ontology_section(data: ReportData, shown: int = 50) -> str:
    """Which branches of the ontology are thin, and the asked concepts short of the goal."""
    counts = data.ontology or {"concepts": 0, "asked": 0, "covered": 0}
    goal = data.min_positives
    branches = _table(
        data.branches[:shown],
        (("branch", "branch"), ("concepts", "concepts"), ("covered", f"with {goal}+ positives"), ("covered_share", "share")),
        "branches",
    )
    thin = _table(
        data.thin[:shown],
        (("phrase", "concept"), ("parent", "parent"), ("images", "images asked"), ("verified_positives", "verified positives")),
        "thin",
    )
    return (
        f'<section id="ontology"><h2>Ontology coverage</h2><p>{counts["covered"]} of {counts["concepts"]} concepts of the ontology '
        f"reach {goal} verified positive pairs; the run asked about {counts['asked']} of them.</p>"
        f"<h3>Thinnest branches (the first {shown})</h3>{branches}"
        f"<h3>Asked concepts short of {goal} verified positives ({len(data.thin)}; the first {shown})</h3>{thin}</section>"
    )


LOOP_GOLD_SHOWN = 50
"""The (round, concept) rows of Gold gained from people that the report lists."""

LOOP_AGREEMENT = (
    ("present_precision", "present: precision"),
    ("present_recall", "present: recall"),
    ("absent_precision", "absent: precision"),
    ("accept_precision", "mask accept: precision"),
)
"""The machines' agreement with people per round, as lines: does a round's answer make the machines look better or worse?"""


def _loop_section(data: ReportData) -> str:
    """The active-learning loop per round (``loop-report``'s tables): what went to people, what came back, what it gained."""
    if not data.loop_rounds:
        return ""
    rounds = [_plotly_text(row["selection"]) for row in data.loop_rounds]
    answered = [row["answered"] for row in data.loop_rounds]
    progress = go.Figure(
        [  # answered and pending stack to the pairs selected; Gold stands beside them
            go.Bar(name="answered", x=rounds, y=answered, offsetgroup="selected"),
            go.Bar(name="pending", x=rounds, y=[row["pending"] for row in data.loop_rounds], base=answered, offsetgroup="selected"),
            go.Bar(name="Gold pairs from people", x=rounds, y=[row["gold_pairs"] for row in data.loop_rounds], offsetgroup="gold"),
        ]
    )
    progress.update_layout(
        barmode="group", title="Pairs selected per round: answered, pending, made Gold", xaxis_title="round (selection)", height=320
    )
    agreement = go.Figure(
        [go.Scatter(name=title, x=rounds, y=[row[key] for row in data.loop_rounds], mode="lines+markers") for key, title in LOOP_AGREEMENT]
    )
    agreement.update_layout(
        title="Machine verifiers against people's answers",
        xaxis_title="round (selection)",
        yaxis_title="share",
        yaxis_range=[0, 1.05],
        height=320,
    )
    columns = (
        ("selection", "round"),
        ("created_at", "selected at"),
        ("selected", "selected"),
        ("answered", "answered"),
        ("pending", "pending"),
        ("drawn_masks", "masks drawn"),
        ("present_precision", "present: precision"),
        ("present_recall", "present: recall"),
        ("absent_precision", "absent: precision"),
        ("absent_recall", "absent: recall"),
        ("accept_precision", "mask accept: precision"),
        ("accept_recall", "mask accept: recall"),
        ("gold_pairs", "Gold pairs"),
        ("gold_concepts", "Gold concepts"),
    )
    gold = (("selection", "round"), ("phrase", "concept"), ("gold_positives", "Gold +"), ("gold_negatives", "Gold -"))
    people = ", ".join(f"<code>{html.escape(name)}</code>" for name in PEOPLE)
    sent = f"{len(data.loop_rounds)} round{'' if len(data.loop_rounds) == 1 else 's'}"
    return (
        '<section id="loop"><h2>Active learning</h2>'
        f"<p>{sent} sent to people. The machine verifiers are measured against the answers of the verifiers that are people, "
        f"{people}; <code>sam3-engine loop-report</code> prints the same tables.</p>"
        f"{progress.to_html(full_html=False, include_plotlyjs=False, div_id='loop-pairs')}"
        f"{agreement.to_html(full_html=False, include_plotlyjs=False, div_id='loop-agreement')}"
        f"{_table(data.loop_rounds, columns, 'loop-rounds')}"
        f"<h3>Gold gained from people, per round and concept (the first {LOOP_GOLD_SHOWN})</h3>"
        f"{_table(data.loop_gold, gold, 'loop-gold')}</section>"
    )


def _verifiers_paragraph(verifiers: list[str]) -> str:
    """Say whose verdicts the counts are: with several verifiers, a pair has a verdict from each, and is counted once per verifier."""
    if not verifiers:
        return ""
    names = " and ".join(f"<code>{html.escape(name)}</code>" for name in verifiers)
    if len(verifiers) == 1:
        return f'<p id="verifiers">Verdicts of {names}.</p>'
    return (
        f'<p id="verifiers">Verdicts of {names}: each pair and mask has a verdict from each of the {len(verifiers)} verifiers, '
        "so the verdict columns and the presence chart count it once per verifier, and the means average them "
        "(<code>--verifier NAME</code> shows one). Pairs, masks, Gold and Silver count each pair once.</p>"
    )


def render(data: ReportData, plotly_src: str | None = None, concept_link: Callable[[dict[str, Any]], str] | None = None) -> str:
    """The report as one HTML document with Plotly inlined, so that it opens with no network.

    The live dashboard passes ``plotly_src``, a same-origin path to load Plotly from (served once, cached), and
    ``concept_link``, where a concept of the coverage table links to (its gallery pages).
    """
    missing = "".join(
        f"<li><code>{html.escape(table)}</code>: run the <code>{html.escape(stage)}</code> stage</li>"
        for table, stage in data.missing.items()
    )
    rejects = _table(data.rejects, (("stage", "stage"), ("reason", "reason"), ("rejects", "rejects")), "rejects")
    sections = [
        f"<h1>Concept coverage: {html.escape(data.run_url)}</h1>",
        f"<p>Built {datetime.now(UTC):%Y-%m-%d %H:%M} UTC from the run's tables. {len(data.coverage)} concepts asked.</p>",
        f'<section id="missing"><h2>Not yet in this run</h2><ul>{missing}</ul></section>' if missing else "",
        '<section id="figures">' + _long_tail(data.coverage) + _presence(data.coverage) + "</section>" if data.coverage else "",
        "<section><h2>Coverage per concept</h2>",
        _verifiers_paragraph(data.verifiers),
        '<input id="filter" placeholder="filter by concept or parent">',
        _ORIGIN_FILTER,
        _table(data.coverage, COVERAGE_COLUMNS, "coverage", concept_link),
        "</section>",
        _changes_section(data),
        _ontology_section(data),
        _distributions_section(data),
        _verification_section(data),
        _loop_section(data),
        data.gallery,
        _negatives_paragraph(data.negatives),
        _near_duplicates_section(data),
        f'<section id="health"><h2>Run health</h2>{_table(data.health, HEALTH_COLUMNS, "run-health")}',
        f"<h3>Rejects by stage and reason</h3>{rejects}</section>",
    ]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>sam3-engine coverage report</title>
<meta http-equiv="Content-Security-Policy" content="{POLICY if plotly_src is None else SERVED_POLICY}">
<style>{STYLE}</style>
{f"<script>{get_plotlyjs()}</script>" if plotly_src is None else f'<script src="{html.escape(plotly_src)}"></script>'}
</head><body>
{"".join(sections)}
<script>{_FILTER}</script>
</body></html>
"""


def write_report(
    run_url: str,
    out_path: str,
    storage_config: StorageConfig | None = None,
    verifier: str | None = None,
    min_positives: int = 10,
    compare_with: str | None = None,
    gallery_concepts: int = 50,
    gallery_per_concept: int = 3,
) -> ReportData:
    data = gather(run_url, storage_config, verifier, min_positives, gallery_concepts, gallery_per_concept)
    if compare_with is not None:
        compare(data, compare_with, storage_config, verifier)
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(render(data))
    return data


POLICY = "default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; img-src data:"
"""Nothing is fetched from anywhere: the page is whole as written (and a script smuggled into a phrase could not call out)."""

SERVED_POLICY = "default-src 'none'; script-src 'self' 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; img-src 'self' data:"
"""The live dashboard's pages: the same, except that scripts and images also come from the dashboard itself."""

ORIGINS = ("caption", "user", "vocabulary", "clip", "hard_negative")
"""Where a concept asked of an image came from (``candidates.origin``): the coverage table filters on it."""

_ORIGIN_FILTER = (
    '<select id="origin"><option value="">any origin</option>'
    + "".join(f'<option value="{origin}_images">asked from {origin.replace("_", " ")}</option>' for origin in ORIGINS)
    + "</select>"
)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: right; }
td[data-column="phrase"], td[data-column="parent"], td[data-column="stage"], td[data-column="reason"],
td[data-column="selection"] { text-align: left; }
th { background: #f4f4f4; cursor: pointer; position: sticky; top: 0; }
#filter { padding: 4px; width: 20em; }
.gallery-row { margin-bottom: 1em; }
.tile { display: inline-block; margin: 0 8px 8px 0; vertical-align: top; width: 260px; font-size: 12px; }
.tile[data-verdict="accepted"] figcaption { color: #1a7f37; }
#pager { margin-top: 1em; }
.placeholder { width: 256px; height: 160px; background: #eee; color: #777; display: flex; align-items: center; justify-content: center; }
"""

_FILTER = """
function applyFilters() {
  const needle = document.getElementById('filter').value.toLowerCase();
  const origin = document.getElementById('origin').value;
  for (const row of document.querySelectorAll('#coverage tbody tr')) {
    const text = row.children[0].textContent + ' ' + row.children[1].textContent;
    const asked = origin === '' || Number(row.querySelector('td[data-column="' + origin + '"]').textContent) > 0;
    row.style.display = text.toLowerCase().includes(needle) && asked ? '' : 'none';
  }
}
document.getElementById('filter').addEventListener('input', applyFilters);
document.getElementById('origin').addEventListener('change', applyFilters);
for (const header of document.querySelectorAll('#coverage th')) {
  header.addEventListener('click', function () {
    const index = Array.from(header.parentNode.children).indexOf(header);
    const body = document.querySelector('#coverage tbody');
    const key = (row) => { const t = row.children[index].textContent; const n = parseFloat(t); return isNaN(n) ? t : n; };
    const rows = Array.from(body.rows);
    const descending = header.dataset.order !== 'desc';
    rows.sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0) * (descending ? -1 : 1));
    header.dataset.order = descending ? 'desc' : 'asc';
    rows.forEach((row) => body.appendChild(row));
  });
}
"""
