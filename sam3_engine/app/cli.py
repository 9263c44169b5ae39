"""The ``sam3-engine`` command line."""

from __future__ import annotations

import csv
import json
import math
import re
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from sam3_engine.engine import catalog, storage
from sam3_engine.engine.config import ConfigError, StorageConfig, load_config
from sam3_engine.engine.stage import discover
from sam3_engine.io.inputs import InputError
from sam3_engine.models.hub import ModelLoadError
from sam3_engine.schemas.tables import TABLES

if TYPE_CHECKING:
    from sam3_engine.app.pipeline import RunResult

app = typer.Typer(
    help="SAM 3 data engine: build verified segmentation datasets from a pile of images.", no_args_is_help=True, add_completion=False
)
# Markup off: paths, phrases and selection names are printed as written ("runs/[draft]" is not a style); styles come from Text.
console = Console(stderr=True, markup=False)
out = Console(markup=False)


def _announce_wait(holder: dict) -> None:
    """What a command says while it waits (``--wait``) for another process to release the run directory."""
    from sam3_engine.engine.lock import describe_holder

    console.print(f"waiting for the run directory: it is in use by {describe_holder(holder)}", highlight=False, soft_wrap=True)


def _announce_push_wait(holder: dict) -> None:
    from sam3_engine.engine.lock import describe_holder

    console.print(f"waiting: this selection is being pushed to the same tool by {describe_holder(holder)}", highlight=False, soft_wrap=True)


def _error(message: str) -> None:
    console.print(Text.assemble(("error:", "bold red"), f" {message}"), highlight=False, soft_wrap=True)


def _fail(message: str, code: int = 2) -> None:
    _error(message)
    raise typer.Exit(code)


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="YAML run configuration (optional: flags alone are enough).")] = None,
    input: Annotated[str | None, typer.Option("--input", "-i", help="Images: folder, glob, manifest or COCO JSON; any fsspec URL.")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Run directory (any fsspec URL).")] = None,
    stages: Annotated[str | None, typer.Option("--stages", help="Comma-separated stages to run, e.g. ingest.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="SAM 3 checkpoint id or directory (proposal stage).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Decoding worker processes.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="KEY=VALUE config override, e.g. ingest.unit_size=64 (YAML value).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="If another run holds the run directory, wait for it instead of refusing.")] = False,
) -> None:
    """Run the pipeline; run it again with the same output to resume after a crash or an interruption."""
    from sam3_engine.app.pipeline import ReconciliationError, RunFailed, run_pipeline, signal_of, stop_on_signals  # torch, Ray: only to run
    from sam3_engine.engine.lock import RunLockedError
    from sam3_engine.engine.runner import default_progress

    overrides = dict(_parse_setting(s) for s in set_ or [])
    overrides.update({"input": input, "output": output, "stages": stages, "model.name": model, "ingest.workers": workers})

    stop_on_signals()
    try:
        resolved = load_config(config, overrides)
        console.print(
            Text.assemble("run directory: ", (resolved.output, "bold"), f"  stages: {', '.join(resolved.stages)}"), highlight=False
        )
        if quiet:
            result = run_pipeline(resolved, announce=_announce, wait_for_lock=wait, on_wait=_announce_wait)
        else:
            with default_progress() as progress:
                result = run_pipeline(resolved, progress, announce=_announce, wait_for_lock=wait, on_wait=_announce_wait)
    except (ConfigError, InputError, ModelLoadError, RunLockedError) as exc:
        _fail(str(exc))
    except ReconciliationError as exc:
        _fail(str(exc), code=3)
    except RunFailed as exc:
        _fail(str(exc), code=1)
    except KeyboardInterrupt as exc:
        signum = signal_of(exc)
        _fail(
            f"interrupted by {signal.Signals(signum).name}: committed work is kept; run the same command again to resume", code=128 + signum
        )
    _print_summary(result)


def _announce(notices: list[str]) -> None:
    for notice in notices:
        console.print(Text.assemble((" WARNING ", "bold yellow on red"), " ", (notice, "bold")), highlight=False)


def _print_summary(result: RunResult) -> None:
    """What the run did, one row per counter, so that no count is cut in an 80-column terminal (``runs.summary_json`` keeps the
    machine-readable copy). A nested count is ``key=value`` and wraps only between entries; a list has a line per item."""
    console.print(
        Text.assemble((f"run {result.run_id}", "bold"), f" (attempt {result.attempt_id[:8]}) in {result.seconds:.1f} s"), highlight=False
    )
    for report in result.stages:
        removed = f", {report.units_removed} removed" if report.units_removed else ""
        units = f"units {report.units_committed} done, {report.units_skipped} skipped{removed} of {report.units_total}"
        console.print(
            Text.assemble((report.name, "bold"), f": {report.items_total} inputs in {report.seconds:.1f} s; {units}"), highlight=False
        )
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True)
        grid.add_column(overflow="fold")
        crashes = {"worker_crashes": report.worker_crashes} if report.worker_crashes else {}
        counters = {**report.counts, **crashes, "executor": report.executor}
        for key, value in counters.items():
            if not (isinstance(value, dict | list) and not value):  # an empty one holds no count
                grid.add_row(Text(f"  {key}"), Text(_summary_value(value)))  # Text: a phrase such as "[x]" is not markup
        console.print(grid, highlight=False)
    for report in result.stages:
        if {"images", "duplicates", "rejects"} <= report.counts.keys():
            c = report.counts
            console.print(
                f"{report.name}: {report.items_total} inputs = {c['images']} images + "
                f"{c['duplicates']} duplicates + {c['rejects']} rejects",
                highlight=False,
            )
    _announce(result.notices)
    console.print(
        f'query it: sam3-engine query {shlex.quote(result.output)} "SELECT * FROM images LIMIT 5"', highlight=False, soft_wrap=True
    )


def _summary_value(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        return "\n".join(map(str, value))
    return "-" if value is None else str(value)


def _split_assignment(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise typer.BadParameter(f"expected NAME=VALUE, got {text!r}")
    name, value = text.split("=", 1)
    return name.strip(), value


def _parse_setting(text: str) -> tuple[str, Any]:
    """A config override: the value is YAML, as in a config file."""
    key, value = _split_assignment(text)
    return key, yaml.safe_load(value)


def _parse_param(text: str) -> tuple[str, Any]:
    """A SQL parameter: JSON when it parses (numbers, lists), else the literal text."""
    name, value = _split_assignment(text)
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


@app.command()
def query(
    run_dir: Annotated[str, typer.Argument(help="Run directory (any fsspec URL).")],
    sql: Annotated[
        str,
        typer.Argument(
            help=(
                "DuckDB SQL over the run's tables (see `sam3-engine tables`) and the "
                "macros mask_verdicts(...), pair_verdicts(...) and verified_positives(); or @NAME for a packaged query "
                "(a report figure: @concept_coverage -p verifier=null, @rejects_by_reason); or @FILE.sql for a file of yours "
                "(SQL that starts with a -- comment must come this way: on the command line it reads as an option)."
            )
        ),
    ],
    format: Annotated[str, typer.Option("--format", "-f", help="table, csv or json.")] = "table",
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="NAME=VALUE bound to $NAME in the SQL (JSON values are parsed).")
    ] = None,
    endpoint_url: Annotated[str | None, typer.Option("--endpoint-url", help="S3-compatible endpoint for s3:// run directories.")] = None,
    max_rows: Annotated[
        int | None,
        typer.Option(
            "--max-rows",
            min=0,
            show_default=False,
            help="Stop after this many rows, in every format [default: 100 for table, all otherwise].",
        ),
    ] = None,
) -> None:
    """Run SQL over a run's committed tables and print the result, streamed: rows past --max-rows are never computed."""
    if format not in ("table", "csv", "json"):
        _fail(f"--format must be table, csv or json, not {format!r}")
    if not sql.strip():
        _fail('the SQL argument is empty: give a query, e.g. "SELECT * FROM images LIMIT 5"')
    params = dict(_parse_param(p) for p in param or [])
    if sql.startswith("@"):
        sql = _query_file(sql[1:]) if sql.endswith(".sql") else _packaged_query(sql[1:])
    storage_config = StorageConfig(endpoint_url=endpoint_url)
    _run_dir(run_dir, storage_config)
    limit = max_rows if max_rows is not None or format != "table" else 100
    try:
        with catalog.stream(run_dir, sql, params, storage_config) as reader:
            printed, more = _print_rows(reader, format, limit)
    except catalog.RunUnreadable as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - DuckDB's message is the useful part
        _fail(f"{type(exc).__name__}: {exc}")
    if more:
        console.print(f"{printed} rows shown; the result has more (--max-rows)", highlight=False)


def _query_file(path: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read the query file {path}: {getattr(exc, 'strerror', None) or exc}")


def _packaged_query(name: str) -> str:
    try:
        return catalog.named_query(name)
    except (FileNotFoundError, OSError):
        _fail(f"no packaged query {name!r}: they are the .sql files of sam3_engine/schemas/sql")


def _print_rows(reader, format: str, limit: int | None) -> tuple[int, bool]:
    """Print a result batch by batch, up to ``limit`` rows; returns the rows printed and whether the result had more."""
    printed, more = 0, False
    if format == "table":
        table = Table(*reader.schema.names)
    elif format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(reader.schema.names)
    else:
        names = reader.schema.names
        shared = sorted({name for name in names if names.count(name) > 1})
        if shared:  # a JSON object has one value per key: one of the columns would be lost
            raise ValueError(f"columns share the name {shared[0]!r}: give each its own with AS for --format json")
        sys.stdout.write("[")
    for batch in reader:
        if limit is not None and batch.num_rows > limit - printed:
            more, batch = True, batch.slice(0, limit - printed)
        for row in zip(*(column.to_pylist() for column in batch.columns), strict=True):  # not dicts: two columns may share a name
            if format == "table":
                table.add_row(*[Text(str(v)) for v in row])  # Text: a value such as "[red]" is not markup
            elif format == "csv":
                writer.writerow([json.dumps(v, default=str) if isinstance(v, list | dict) else v for v in row])
            else:
                record = json.dumps(_json_safe(dict(zip(names, row, strict=True))), default=str, ensure_ascii=False, allow_nan=False)
                sys.stdout.write(("," if printed else "") + "\n" + record)
            printed += 1
        if more:
            break
    if format == "table":
        out.print(table)
    elif format == "json":
        sys.stdout.write("\n]\n" if printed else "]\n")
    return printed, more


def _json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity (strict parsers refuse the tokens Python would write): such a float is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def _run_dir(run_dir: str, storage_config: StorageConfig) -> None:
    """A one-line error unless ``run_dir`` is a run directory this process can read (credentials, endpoint, permissions)."""
    from botocore.exceptions import NoCredentialsError

    try:
        fs, root = storage.filesystem(run_dir, storage_config)
        found = fs.exists(storage.join(root, "run.json"))
    except NoCredentialsError:
        _fail(f"cannot read {run_dir}: no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")
    except Exception as exc:  # noqa: BLE001 - fsspec, s3fs and botocore raise many kinds; each names its cause
        _fail(f"cannot read {run_dir}: {type(exc).__name__}: {exc}")
    if not found:
        _fail(f"{run_dir} is not a run directory (it has no run.json)")


def _check_verifier(run_dir: str, storage_config: StorageConfig, verifier: str | None) -> None:
    """Read the run's tables once (a damaged run is one line, not a page of errors) and check a ``--verifier`` is the run's:
    an unknown one would show every verdict column empty."""
    con = catalog.connect(run_dir, storage_config)
    try:
        known = [row[0] for row in con.execute(catalog.named_query("verifiers")).fetchall()]
    finally:
        con.close()
    if verifier is not None and verifier not in known:
        _fail(f"{run_dir} has no verifier {verifier!r}; its verifiers: {', '.join(known) or 'none yet (run verify)'}")


@app.command()
def calibrate(
    run_dir: Annotated[str, typer.Argument(help="Run directory (any fsspec URL) whose verify or verify_vlm stage has run.")],
    labels: Annotated[
        str,
        typer.Option(
            "--labels", "-l", help="Human labels: .parquet, .csv or .jsonl with pair_id + present/exhaustive and/or mask_id + good."
        ),
    ],
    target_precision: Annotated[
        float, typer.Option("--target-precision", "-t", min=0.0, max=1.0, help="Precision each fitted threshold must reach.")
    ] = 0.9,
    verifier: Annotated[
        str, typer.Option("--verifier", help="Whose scores and verdicts to calibrate (verify.verifier or verify_vlm.verifier).")
    ] = "sam3-clip",
    write: Annotated[
        Path | None,
        typer.Option(
            "--write", "-w", help="Write the fitted thresholds as the verifier's YAML section (`verify:` or `verify_vlm:`) to this file."
        ),
    ] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="table or json.")] = "table",
    endpoint_url: Annotated[str | None, typer.Option("--endpoint-url", help="S3-compatible endpoint for s3:// paths.")] = None,
) -> None:
    """Fit verification thresholds to human labels at a target precision; report each signal's and verdict's precision and recall."""
    from sam3_engine.app.calibration import calibrate as fit
    from sam3_engine.engine.store import TableStore

    if format not in ("table", "json"):
        _fail(f"--format must be table or json, not {format!r}")
    storage_config = StorageConfig(endpoint_url=endpoint_url)
    _run_dir(run_dir, storage_config)
    try:
        report = fit(TableStore(run_dir, storage_config), storage.read_table(labels, storage_config), verifier, target_precision)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    if write is not None:
        try:
            write.write_text(yaml.safe_dump({report["config_section"]: report["thresholds"]}, sort_keys=False))
        except OSError as exc:
            _fail(f"cannot write --write {write}: {exc.strerror or exc}")
    if format == "json":
        out.print_json(json.dumps(report))
        return
    given, matched = report["labels"]["given"], report["labels"]["matched"]
    console.print(
        f"labels: {matched['pairs']} of {given['pairs']} pairs and {matched['masks']} of "
        f"{given['masks']} masks found in the run (verifier {verifier})"
    )
    for level in ("pair", "mask"):  # a table per level, and the config key under its signal: it fits 80 columns
        signals = _wrapping_table(
            f"{level} signals: thresholds at precision >= {target_precision}",
            ["signal (config key)", "predicts"],
            ["threshold", "precision", "recall", "labelled"],
        )
        for f in (f for f in report["signals"] if f["level"] == level):
            named = f["signal"] + (f"\n({f['config_key']})" if f["config_key"] else "")
            numbers = (_number(f["threshold"]), _number(f["precision"]), _number(f["recall"]), str(f["labelled"]))
            signals.add_row(Text(named), Text(f["predicts"]), *numbers)
        out.print(signals)
    verdicts = _wrapping_table("verdicts as they stand", ["verifier", "level", "verdict", "label"], ["precision", "recall", "labelled"])
    for v in report["verdicts"]:
        verdicts.add_row(
            v["verifier"], v["level"], v["verdict"], v["label"], _number(v["precision"]), _number(v["recall"]), str(v["labelled"])
        )
    out.print(verdicts)
    if write is not None:
        console.print(
            f"wrote {len(report['thresholds'])} threshold(s) to {write}: merge its {report['config_section']} "
            f"section into the config and run `--stages {report['config_section']}` (no model runs)"
        )


@app.command("import-labels")
def import_labels(
    run_dir: Annotated[str, typer.Argument(help="Run directory (any fsspec URL).")],
    labels: Annotated[
        str,
        typer.Option(
            "--labels", "-l", help="Human labels: .parquet, .csv or .jsonl with pair_id + present/exhaustive and/or mask_id + good."
        ),
    ],
    verifier: Annotated[
        str, typer.Option("--verifier", help="Name the labels are stored under (one of splits.human_verifiers for Gold).")
    ] = "human",
    endpoint_url: Annotated[str | None, typer.Option("--endpoint-url", help="S3-compatible endpoint for s3:// paths.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="If a run holds the run directory, wait for it instead of refusing.")] = False,
) -> None:
    """Store human labels as a verifier's verdicts (replacing its earlier import): splits make them Gold,
    calibrate scores machines against them.
    """
    from sam3_engine.app.labels import import_labels as store_labels
    from sam3_engine.engine.lock import RunLock, RunLockedError
    from sam3_engine.engine.store import TableStore

    storage_config = StorageConfig(endpoint_url=endpoint_url)
    _run_dir(run_dir, storage_config)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", verifier):
        _fail(f"--verifier must be letters, digits, '_', '.' or '-', not {verifier!r}")

    try:
        table = storage.read_table(labels, storage_config)
        with RunLock(run_dir, storage_config, command="import-labels").acquire(wait, _announce_wait):
            counts = store_labels(TableStore(run_dir, storage_config), table, verifier)
    except (ValueError, OSError, RunLockedError) as exc:
        _fail(str(exc))
    stored = f"verifier {verifier}: {counts['pairs']} pair and {counts['masks']} mask labels stored"
    console.print(f"{stored}; {counts['unmatched']} labels name no pair or mask of this run", highlight=False, soft_wrap=True)


@app.command("select")
def select_for_review(
    run_dir: Annotated[str, typer.Argument(help="Run directory (any fsspec URL).")],
    budget: Annotated[int, typer.Option("--budget", "-n", min=1, help="Pairs to select (whole images at a time).")],
    strategy: Annotated[
        list[str] | None,
        typer.Option(
            "--strategy",
            "-s",
            help="NAME[=WEIGHT], repeatable: uncertainty, disagreement, coverage, diversity, random "
            "(default: uncertainty=1 disagreement=1 coverage=0.5 diversity=0.5).",
        ),
    ] = None,
    name: Annotated[str, typer.Option("--name", help="The selection's name (a review round); selecting again under it replaces it.")] = (
        "round-1"
    ),
    max_pairs_per_image: Annotated[int, typer.Option("--max-pairs-per-image", min=1, help="At most this many phrases per image.")] = 10,
    min_positives: Annotated[
        int, typer.Option("--min-positives", min=1, help="The coverage strategy's target of verified positives per concept.")
    ] = 10,
    human_verifier: Annotated[
        list[str] | None,
        typer.Option("--human-verifier", help="Verifiers that are people (default: human, label-studio, cvat); their pairs are done."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random strategy.")] = 0,
    endpoint_url: Annotated[str | None, typer.Option("--endpoint-url", help="S3-compatible endpoint for s3:// paths.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="If a run holds the run directory, wait for it instead of refusing.")] = False,
) -> None:
    """Select (image, phrase) pairs for people to review, into the selections table: filters, then a weighted greedy choice."""
    from sam3_engine.engine.lock import RunLock, RunLockedError
    from sam3_engine.engine.store import TableStore
    from sam3_engine.labeling.select import SelectionError, parse_strategies, select

    storage_config = StorageConfig(endpoint_url=endpoint_url)
    _run_dir(run_dir, storage_config)
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        _fail(f"--name must be 1 to 64 letters, digits, '_', '.' or '-', not {name!r}")

    try:
        weights = parse_strategies(strategy)
        with RunLock(run_dir, storage_config, command="select").acquire(wait, _announce_wait):
            chosen = select(
                TableStore(run_dir, storage_config),
                name,
                budget,
                weights,
                max_pairs_per_image,
                min_positives,
                tuple(human_verifier or ("human", "label-studio", "cvat")),
                seed,
            )
    except (SelectionError, RunLockedError, OSError) as exc:
        _fail(str(exc))
    if not chosen.rows.num_rows:
        console.print(
            f"selection {name}: nothing to select, so nothing stored: no proposed pair is left that no person has answered "
            "and no other selection has out for review (pull the answers of earlier rounds, or propose on more images)",
            highlight=False,
            soft_wrap=True,
        )
        return
    leading = ", ".join(f"{k} {v}" for k, v in sorted(chosen.by_strategy.items(), key=lambda kv: -kv[1]))
    console.print(
        f"selection {name}: {chosen.rows.num_rows} pairs on {chosen.images} images, of {chosen.candidates} candidates"
        + (f" (led by {leading})" if leading else ""),
        highlight=False,
        soft_wrap=True,
    )


labeling = typer.Typer(help="The round trip through a labelling tool: push a selection out, pull the answers back.", no_args_is_help=True)
app.add_typer(labeling, name="labeling")


@labeling.command("push")
def labeling_push(
    run_dir: Annotated[str, typer.Argument(help="Run directory (any fsspec URL).")],
    selection: Annotated[str, typer.Option("--selection", help="The selection to send (sam3-engine select --name).")],
    to: Annotated[str, typer.Option("--to", help="The tool: label-studio (a server) or cvat (files).")] = "label-studio",
    url: Annotated[
        str | None, typer.Option("--url", help="Label Studio's address, e.g. http://127.0.0.1:8080 (token: $LABEL_STUDIO_API_KEY).")
    ] = None,
    files_root: Annotated[
        str | None,
        typer.Option("--files-root", help="For local images: the server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (images below it)."),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="cvat: the folder to write the task bundle to.")] = None,
    endpoint_url: Annotated[str | None, typer.Option("--endpoint-url", help="S3-compatible endpoint for s3:// paths.")] = None,
) -> None:
    """Send a selection out: a Label Studio project (one task per image, the engine's masks as pre-annotations) or a CVAT bundle."""
    from sam3_engine.engine.store import TableStore
    from sam3_engine.labeling.answers import LabelingError, push_lock

    storage_config = StorageConfig(endpoint_url=endpoint_url)
    _run_dir(run_dir, storage_config)
    if to not in ("label-studio", "cvat"):
        _fail(f"--to {to!r}: the tools are label-studio and cvat")
    if to == "label-studio" and url is None:
        _fail("--to label-studio needs --url")
    if to == "cvat" and out is None:
        _fail("--to cvat needs --out DIR")
    store = TableStore(run_dir, storage_config)
    try:  # a second push of the selection to the tool waits for the first, then finds its project and tasks
        with push_lock(store, to, selection).acquire(wait=True, on_wait=_announce_push_wait):
            if to == "label-studio":
                from sam3_engine.labeling.label_studio import push

                pushed = push(store, selection, url, files_root)
                done = f"project {pushed.project_id}, {pushed.created} tasks created, {pushed.already_there} already there"
            else:
                from sam3_engine.labeling.cvat import write_bundle

                written = write_bundle(store, selection, str(out))
                done = f"{written['images']} images and {written['masks']} masks in {out} (annotations.xml: CVAT for images 1.1)"
    except (LabelingError, OSError) as exc:
        _fail(str(exc))
    console.print(f"selection {selection}: {done}", highlight=False, soft_wrap=True)


@labeling.command("pull")
def labeling_pull(
    run_dir: Annotated[str, typer.Argument(help="Run directory (any fsspec URL).")],
    selection: Annotated[str, typer.Option("--selection", help="The selection whose answers to read.")],
    from_: Annotated[str, typer.Option("--from", help="The tool: label-studio (a server) or cvat (its export).")] = "label-studio",
    url: Annotated[str | None, typer.Option("--url", help="Label Studio's address (token: $LABEL_STUDIO_API_KEY).")] = None,
    export: Annotated[
        Path | None, typer.Option("--in", help="cvat: the task's export, 'CVAT for images 1.1' (the zip or its annotations.xml).")
    ] = None,
    endpoint_url: Annotated[str | None, typer.Option("--endpoint-url", help="S3-compatible endpoint for s3:// paths.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="If a run holds the run directory, wait for it instead of refusing.")] = False,
) -> None:
    """Read people's answers back: human_labels, human_masks and the tool's verdicts (splits makes the pairs Gold)."""
    from sam3_engine.engine.lock import RunLock, RunLockedError
    from sam3_engine.engine.store import TableStore
    from sam3_engine.labeling.answers import LabelingError

    storage_config = StorageConfig(endpoint_url=endpoint_url)
    _run_dir(run_dir, storage_config)
    if from_ == "label-studio" and url is None:
        _fail("--from label-studio needs --url")
    if from_ == "cvat" and export is None:
        _fail("--from cvat needs --in EXPORT.zip")
    if from_ not in ("label-studio", "cvat"):
        _fail(f"--from {from_!r}: the tools are label-studio and cvat")

    try:
        with RunLock(run_dir, storage_config, command="labeling pull").acquire(wait, _announce_wait):
            store = TableStore(run_dir, storage_config)
            if from_ == "label-studio":
                from sam3_engine.labeling.label_studio import pull

                pulled = pull(store, selection, url)
            else:
                from sam3_engine.labeling.cvat import read_export

                pulled = read_export(store, selection, str(export))
    except (LabelingError, RunLockedError, ValueError, OSError) as exc:
        _fail(str(exc))
    skipped = "".join(f"; skipped {n} ({reason})" for reason, n in sorted(pulled.skipped.items()))
    console.print(
        f"selection {selection}: {pulled.pairs} pairs answered, {pulled.drawn_masks} masks drawn, {pulled.pending} pending{skipped}",
        highlight=False,
        soft_wrap=True,
    )


@app.command("loop-report")
def loop_report(
    run_dir: Annotated[str, typer.Argument(help="Run directory (any fsspec URL).")],
    human_verifier: Annotated[
        list[str] | None, typer.Option("--human-verifier", help="Verifiers that are people (default: human, label-studio, cvat).")
    ] = None,
    top: Annotated[int, typer.Option("--top", min=0, help="Concepts to list under Gold gained.")] = 15,
    endpoint_url: Annotated[str | None, typer.Option("--endpoint-url", help="S3-compatible endpoint for s3:// paths.")] = None,
) -> None:
    """The active-learning loop per round: selected, answered, machines against people, Gold gained (@loop_rounds, @loop_gold)."""
    storage_config = StorageConfig(endpoint_url=endpoint_url)
    _run_dir(run_dir, storage_config)
    params = {"human_verifiers": list(human_verifier or ("human", "label-studio", "cvat"))}
    rounds = catalog.query(run_dir, catalog.named_query("loop_rounds"), params, storage_config).to_pylist()
    gold = catalog.query(run_dir, catalog.named_query("loop_gold"), params, storage_config).to_pylist()
    if not rounds:
        console.print(f"no selections in {run_dir}: make one with sam3-engine select", highlight=False, soft_wrap=True)
        return
    # In 80 columns: numbers never shrink (no "0.9…"), a long round or concept name wraps instead; P/R in percent.
    numbers = ["pairs", "answered", "pending", "present\nP/R %", "absent\nP/R %", "mask\nP/R %", "gold"]
    table = _wrapping_table("Rounds (pairs selected per round)", ["round"], numbers)
    for row in rounds:
        table.add_row(
            Text(row["selection"]),
            str(row["selected"]),
            str(row["answered"]),
            str(row["pending"]),
            f"{_percent(row['present_precision'])}/{_percent(row['present_recall'])}",
            f"{_percent(row['absent_precision'])}/{_percent(row['absent_recall'])}",
            f"{_percent(row['accept_precision'])}/{_percent(row['accept_recall'])}",
            str(row["gold_pairs"]),
        )
    out.print(table)
    if gold and top:
        gained = _wrapping_table("Gold gained from people", ["round", "concept"], ["gold +", "gold -"])
        for row in gold[:top]:
            gained.add_row(Text(row["selection"]), Text(row["phrase"]), str(row["gold_positives"]), str(row["gold_negatives"]))
        out.print(gained)
    console.print("P/R %: precision/recall of the machines' verdicts against people's answers", highlight=False)


def _wrapping_table(title: str, names: list[str], numbers: list[str]) -> Table:
    """A table whose name columns wrap and whose number columns keep their width."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)  # no side rules: their width goes to the names
    for name in names:
        table.add_column(name, overflow="fold")
    for name in numbers:
        table.add_column(name, justify="right", no_wrap=True)
    return table


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}"


@app.command("eval")
def evaluate(
    paths: Annotated[
        list[str] | None,
        typer.Argument(help="RUN_DIR with --split; or more ground-truth files after --gt (SA-Co Gold ships three).", show_default=False),
    ] = None,
    pred: Annotated[
        str | None,
        typer.Option("--pred", help="Predictions: a COCO results JSON list (image_id = the SA-Co pair id, segmentation RLE, score, bbox)."),
    ] = None,
    gt: Annotated[
        list[str] | None,
        typer.Option("--gt", help="SA-Co ground-truth JSON; repeat it, or list more files after it, for several annotators."),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option("--split", "-s", help="With RUN_DIR: evaluate the run's own proposals against this split (train, val, test)."),
    ] = None,
    tier: Annotated[str, typer.Option("--tier", "-t", help="With --split: gold, silver or all.")] = "gold",
    iou_type: Annotated[str, typer.Option("--iou-type", help="segm (masks) or bbox (boxes).")] = "segm",
    allow_mismatch: Annotated[
        bool,
        typer.Option(
            "--allow-mismatch",
            help="Evaluate despite bad references (predictions of unknown pairs, "
            "annotations of missing images, RLEs that do not decode or are not their image's size).",
        ),
    ] = False,
    endpoint_url: Annotated[str | None, typer.Option("--endpoint-url", help="S3-compatible endpoint for s3:// paths.")] = None,
) -> None:
    """SA-Co metrics as JSON: cgF1, IL_MCC, pmF1 (cgF1 and pmF1 in percent), also at IoU 0.5 and 0.75, with
    precision, recall and image-level counts.
    """
    import tempfile

    from sam3_engine.app.export import ExportError, export, predictions
    from sam3_engine.engine.store import TableStore
    from sam3_engine.metrics.cgf1 import EvaluationError, load_json
    from sam3_engine.metrics.cgf1 import evaluate as cgf1

    storage_config = StorageConfig(endpoint_url=endpoint_url)
    read = lambda path: storage.read_text(path, storage_config)  # noqa: E731
    try:
        if split is not None:
            if pred is not None or gt or len(paths or []) != 1:
                _fail("with --split give one RUN_DIR and no --pred or --gt")
            _run_dir(paths[0], storage_config)
            store = TableStore(paths[0], storage_config)
            with tempfile.TemporaryDirectory() as folder:
                files = export(store, split, tier, "saco", f"{folder}/{tier}_{split}.json", StorageConfig()).files
                truths, names = [load_json(path, read) for path in files], files
            result = cgf1(predictions(store, split, tier), truths, iou_type, names, f"the run's {split} proposals", allow_mismatch)
        else:
            truths = [*(gt or []), *(paths or [])]
            if pred is None or not truths:
                _fail("give --pred PRED.json and --gt GT.json (more ground-truth files may follow), or RUN_DIR --split NAME")
            result = cgf1(load_json(pred, read), [load_json(path, read) for path in truths], iou_type, truths, pred, allow_mismatch)
    except (EvaluationError, ExportError, OSError) as exc:
        _fail(str(exc))
    mismatched = {kind: n for kind, n in result["mismatches"].items() if n}
    if mismatched:
        console.print(
            Text.assemble(("warning:", "bold yellow"), f" evaluated despite bad references (--allow-mismatch): {mismatched}"),
            highlight=False,
            soft_wrap=True,
        )
    out.print_json(json.dumps(result))


@app.command("export")
def export_split(
    run_dir: Annotated[str, typer.Argument(help="Run directory (any fsspec URL) whose splits stage has run.")],
    split: Annotated[str, typer.Option("--split", "-s", help="train, val or test.")],
    out: Annotated[
        str,
        typer.Option(
            "--out", "-o", help="Output file (any fsspec URL); SA-Co Gold with several sources writes OUT_a.json, OUT_b.json, ..."
        ),
    ],
    format: Annotated[
        str,
        typer.Option("--format", "-f", help="saco (one entry per image-phrase pair), coco (instances, categories = concepts) or parquet."),
    ] = "saco",
    tier: Annotated[str, typer.Option("--tier", "-t", help="gold, silver or all.")] = "all",
    endpoint_url: Annotated[str | None, typer.Option("--endpoint-url", help="S3-compatible endpoint for s3:// paths.")] = None,
) -> None:
    """Export one split of the benchmark as SA-Co JSON, COCO instances JSON or Parquet."""
    from sam3_engine.app.export import ExportError, export
    from sam3_engine.engine.store import TableStore

    storage_config = StorageConfig(endpoint_url=endpoint_url)
    _run_dir(run_dir, storage_config)
    try:
        report = export(TableStore(run_dir, storage_config), split, tier, format, out, storage_config)
    except ExportError as exc:
        _fail(str(exc))
    written = f"{report.pairs} pairs ({report.positives} positive, {report.negatives} negative) and {report.masks} masks"
    console.print(f"{written} -> {', '.join(report.files)}", highlight=False, soft_wrap=True)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


@app.command()
def report(
    run_dir: Annotated[str, typer.Argument(help="Run directory (any fsspec URL).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")] = Path("report.html"),
    verifier: Annotated[str | None, typer.Option("--verifier", help="Whose verdicts count (default: every verifier's).")] = None,
    min_positives: Annotated[
        int, typer.Option("--min-positives", min=1, help="Verified positive pairs a concept needs to count as covered.")
    ] = 10,
    compare_with: Annotated[
        str | None, typer.Option("--compare", help="Another run (an earlier one): concepts that gained or lost verified positives.")
    ] = None,
    gallery: Annotated[
        int, typer.Option("--gallery", min=0, help="Mask gallery: images per concept (0: no gallery), chosen by a hash, so stable.")
    ] = 3,
    gallery_concepts: Annotated[int, typer.Option("--gallery-concepts", min=1, help="Concepts in the gallery: the most proposed.")] = 50,
    endpoint_url: Annotated[str | None, typer.Option("--endpoint-url", help="S3-compatible endpoint for s3:// run directories.")] = None,
) -> None:
    """Write the concept-coverage report: one HTML file that opens with no network (Plotly inlined)."""
    from sam3_engine.dashboards.report import write_report

    storage_config = StorageConfig(endpoint_url=endpoint_url)
    _run_dir(run_dir, storage_config)
    _check_verifier(run_dir, storage_config, verifier)
    if compare_with is not None:
        _run_dir(compare_with, storage_config)
        _check_verifier(compare_with, storage_config, verifier)
    try:
        data = write_report(run_dir, str(out), storage_config, verifier, min_positives, compare_with, gallery_concepts, gallery)
    except OSError as exc:
        _fail(f"cannot write {out}: {exc.strerror or exc}")
    missing = f"; not yet in the run: {', '.join(data.missing)}" if data.missing else ""
    console.print(f"wrote {out}: {len(data.coverage)} concepts{missing}", highlight=False, soft_wrap=True)


@app.command()
def dashboard(
    run_dir: Annotated[str, typer.Argument(help="Run directory (any fsspec URL).")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on; 0.0.0.0 shows the run's data to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="Port to listen on (0: any free one, printed).")] = 8765,
    verifier: Annotated[str | None, typer.Option("--verifier", help="Whose verdicts count (default: every verifier's).")] = None,
    min_positives: Annotated[
        int, typer.Option("--min-positives", min=1, help="Verified positive pairs a concept needs to count as covered.")
    ] = 10,
    page_size: Annotated[int, typer.Option("--page-size", min=1, max=200, help="Pairs per gallery page.")] = 12,
    endpoint_url: Annotated[str | None, typer.Option("--endpoint-url", help="S3-compatible endpoint for s3:// run directories.")] = None,
) -> None:
    """Serve the coverage report live, the mask gallery fetched page by page; for runs too large for one file."""
    from sam3_engine.dashboards.live import Dashboard, listen, server

    if not host.strip():
        _fail("--host is empty: give an address (127.0.0.1 for this machine alone, 0.0.0.0 for every network)")
    storage_config = StorageConfig(endpoint_url=endpoint_url)
    _run_dir(run_dir, storage_config)
    _check_verifier(run_dir, storage_config, verifier)
    try:
        sock = listen(host, port)
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    address = f"[{host}]" if ":" in host else host
    console.print(f"dashboard of {run_dir} at http://{address}:{sock.getsockname()[1]}/ (Ctrl-C stops it)", highlight=False, soft_wrap=True)
    server(Dashboard(run_dir, storage_config, verifier, min_positives, page_size)).run(sockets=[sock])


@app.command()
def tables(name: Annotated[str | None, typer.Argument(help="One table to describe.")] = None) -> None:
    """Describe the engine's tables: columns, types and what each means."""
    discover()
    if name is not None and name not in TABLES:
        _fail(f"no table {name!r}; tables: {', '.join(TABLES)}")
    for spec in [TABLES[name]] if name else TABLES.values():
        table = Table(
            "column", "type", "nullable", "meaning", title=f"{spec.name} (schema v{spec.version}): {spec.doc}", title_justify="left"
        )
        for column in spec.columns:
            table.add_row(column.name, str(column.type), "yes" if column.nullable else "no", column.doc)
        out.print(table)


@app.command()
def validate(config: Annotated[Path, typer.Argument(help="YAML run configuration.")]) -> None:
    """Check a config file and print it with every default filled in."""
    try:
        resolved = load_config(config)
    except ConfigError as exc:
        _fail(str(exc))
    out.print(resolved.to_yaml(), highlight=False)


def main() -> None:
    try:
        app()
    except catalog.RunUnreadable as exc:  # any command on a damaged run directory
        _error(str(exc))
        sys.exit(2)
    except Exception as exc:
        message = _storage_error(exc)
        if message is None:
            raise
        _error(message)
        sys.exit(2)


def _storage_error(exc: Exception) -> str | None:
    """S3's refusals that reach a command outside the run directory's checks (an --out, --labels or --pred on s3://), in a line.

    Only when botocore is loaded: an error cannot be one of its own otherwise, and ``--help`` does not pay for importing it.
    """
    errors = sys.modules.get("botocore.exceptions")
    if errors is None:
        return None
    if isinstance(exc, errors.NoCredentialsError):
        return "no AWS credentials for s3:// (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
    if isinstance(exc, errors.BotoCoreError | errors.ClientError):
        return f"S3: {type(exc).__name__}: {' '.join(str(exc).split())}"
    return None
