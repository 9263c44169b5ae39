import json
import os
import resource
import shlex
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from sam3_engine.app.cli import _number
from tests.conftest import REPO


def cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "sam3_engine", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_quickstart_summary_reconciles(quickstart):
    _, done = quickstart
    assert "3 inputs = 3 images + 0 duplicates + 0 rejects" in done.stderr


def _shown(value):
    return "-" if value is None else str(value)


def test_the_summary_shows_every_count_within_80_columns(quickstart):
    run_dir, done = quickstart
    (row,) = json.loads(cli("query", str(run_dir), "SELECT run_id, summary_json FROM runs", "-f", "json").stdout)
    summary = json.loads(row["summary_json"])
    lines = done.stderr.splitlines()
    start = lines.index(next(line for line in lines if line.startswith(f"run {row['run_id']} (attempt ")))
    printed = [line for line in lines[start:] if not line.startswith("query it: ")]  # a command to copy stays one line
    assert all(len(line) <= 80 for line in printed), [line for line in printed if len(line) > 80]
    assert "…" not in done.stderr
    sections = {}
    for line in printed[1:]:
        if not line.startswith(" ") and ":" in line:
            sections.setdefault(line.split(":", 1)[0], []).append(line)
        else:
            list(sections.values())[-1].append(line)
    for stage in summary["stages"]:
        section = sections[stage["name"]]
        assert f"{stage['items_total']} inputs in " in section[0] and f"units {stage['units_committed']} done" in section[0]
        rows = [line.rstrip() for line in section[1:]]
        for key, value in {**stage["counts"], "executor": stage["executor"]}.items():
            if isinstance(value, dict):
                for entry in (f"{k}={_shown(v)}" for k, v in value.items()):
                    assert any(entry in line.split() or f"{entry}," in line.split() for line in rows), (stage["name"], key, entry)
            elif isinstance(value, list):
                for item in value:
                    assert any(line.endswith(f"  {item}") for line in rows), (stage["name"], key, item)
            else:
                assert any(line.split() == [key, _shown(value)] for line in rows), (stage["name"], key, value)


def test_quickstart_proposes_masks_for_the_mined_concepts_and_hard_negatives(quickstart):
    run_dir, _ = quickstart
    sql = (
        "SELECT c.origin, count(DISTINCT c.pair_id) AS candidates, count(DISTINCT "
        "p.pair_id) AS proposed, sum(p.instance_count)::BIGINT AS instances "
        "FROM candidates c LEFT JOIN pairs p USING (pair_id) GROUP BY c.origin ORDER BY c.origin"
    )
    by_origin = {r["origin"]: r for r in json.loads(cli("query", str(run_dir), sql, "-f", "json").stdout)}
    assert {"caption", "hard_negative"} <= set(by_origin) <= {"caption", "clip", "hard_negative"}
    assert all(r["candidates"] == r["proposed"] > 0 for r in by_origin.values())
    assert by_origin["caption"]["instances"] > 0
    assert by_origin["hard_negative"]["candidates"] <= 3 * 8
    phrases = json.loads(
        cli("query", str(run_dir), "SELECT list(DISTINCT phrase) AS p FROM candidates WHERE origin = 'caption'", "-f", "json").stdout
    )[0]["p"]
    assert {"grocery bag", "car", "pickup truck", "child", "basketball court"} <= set(phrases)


def test_query_formats_and_bound_parameters(quickstart):
    run_dir, _ = quickstart
    sql = "SELECT width, height FROM images WHERE width > $min_width ORDER BY width"
    as_json = cli("query", str(run_dir), sql, "--format", "json", "--param", "min_width=900")
    assert json.loads(as_json.stdout) == [{"width": 1280, "height": 720}, {"width": 1800, "height": 1200}]
    as_csv = cli("query", str(run_dir), sql, "-f", "csv", "-p", "min_width=900")
    assert as_csv.stdout.splitlines() == ["width,height", "1280,720", "1800,1200"]
    as_table = cli("query", str(run_dir), sql, "-p", "min_width=900")
    assert "1800" in as_table.stdout and "534" not in as_table.stdout
    hostile = cli("query", str(run_dir), "SELECT count(*) AS n FROM images WHERE uri = $u", "-f", "json", "-p", "u=x' OR '1'='1")
    assert json.loads(hostile.stdout) == [{"n": 0}]
    odd = "SELECT 'nan'::DOUBLE AS x, [1.5, 'inf'::DOUBLE] AS y, {'z': '-inf'::DOUBLE} AS z"
    strict = json.loads(cli("query", str(run_dir), odd, "-f", "json").stdout, parse_constant=lambda token: pytest.fail(token))
    assert strict == [{"x": None, "y": [1.5, None], "z": {"z": None}}]  # JSON has no NaN or infinity
    both = cli("query", str(run_dir), "SELECT m.height, p.height FROM masks m JOIN pairs p USING (pair_id) LIMIT 1", "-f", "json")
    assert both.returncode == 2 and both.stdout == "" and "columns share the name 'height'" in both.stderr  # not one of them lost
    assert len(both.stderr.splitlines()) == 1


def test_s3_paths_beside_a_local_run_without_credentials_or_endpoint_are_one_line_errors(quickstart, tmp_path):
    run_dir, _ = quickstart
    bare = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    no_credentials = {**bare, "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none")}
    no_credentials["AWS_EC2_METADATA_DISABLED"] = "true"
    for args in (
        ("export", str(run_dir), "--split", "train", "--format", "coco", "--out", "s3://bucket/x.json"),
        ("calibrate", str(run_dir), "--labels", "s3://bucket/labels.csv"),
        ("import-labels", str(run_dir), "--labels", "s3://bucket/labels.csv"),
        ("eval", "--pred", "s3://bucket/p.json", "--gt", "s3://bucket/g.json"),
    ):
        done = cli(*args, env=no_credentials)
        assert done.returncode == 2 and done.stderr.startswith("error: no AWS credentials for s3://"), (args, done.stderr)
        assert len(done.stderr.splitlines()) == 1
    elsewhere = {**no_credentials, "AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret"}
    out = ("--out", "s3://bucket/x.json", "--endpoint-url", "http://127.0.0.1:9")  # nothing listens on port 9
    done = cli("export", str(run_dir), "--split", "train", "--format", "coco", *out, env=elsewhere)
    assert done.returncode == 2 and done.stderr.startswith("error: S3: EndpointConnectionError") and len(done.stderr.splitlines()) == 1


def test_query_errors_and_empty_tables(quickstart):
    run_dir, _ = quickstart
    bad = cli("query", str(run_dir), "SELECT nope FROM images")
    assert bad.returncode == 2 and "nope" in bad.stderr
    empty = cli("query", str(run_dir), "SELECT count(*) AS n FROM rejects", "-f", "json")
    assert json.loads(empty.stdout) == [{"n": 0}]
    nowhere = cli("query", str(run_dir.parent / "no-such-run"), "SELECT 1")
    assert nowhere.returncode == 2 and "not a run directory" in nowhere.stderr


def _measured(run_dir, *args):
    """The query command's exit status, output and peak resident memory (MiB).

    Its data segment is capped at 4 GiB so that code holding a whole large result fails here instead of taking the machine's memory.
    """

    def cap():
        resource.setrlimit(resource.RLIMIT_DATA, (4 << 30, 4 << 30))

    command = [sys.executable, "-m", "sam3_engine", "query", str(run_dir), *args]
    done = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=cap)
    out, err = done.stdout.read(), done.stderr.read()  # small: the command prints a few rows
    _, status, usage = os.wait4(done.pid, 0)
    done.stdout.close()
    done.stderr.close()
    return os.waitstatus_to_exitcode(status), out, err.decode(), usage.ru_maxrss // 1024


@pytest.fixture()
def bare_run(tmp_path):
    """A run directory with no table written yet: enough for SQL that reads none."""
    (tmp_path / "run.json").write_text("{}")
    return tmp_path


def test_query_streams_and_stops_at_max_rows_in_every_format(bare_run):
    status, _, _, baseline = _measured(bare_run, "SELECT 1")
    assert status == 0
    fifty_million = "SELECT * FROM range(50000000)"  # 400 MB as one Arrow column; gigabytes as Python rows
    for fmt in ("table", "csv", "json"):
        status, out, err, peak = _measured(bare_run, fifty_million, "--format", fmt, "--max-rows", "2")
        assert status == 0, err
        assert peak < baseline + 128, (fmt, peak, baseline)  # a batch at a time, and the rest never computed
        assert err == "2 rows shown; the result has more (--max-rows)\n"
        if fmt == "csv":
            assert out == b"range\n0\n1\n"  # \n line ends, never \r\n
        elif fmt == "json":
            assert json.loads(out) == [{"range": 0}, {"range": 1}]
        else:
            assert "│ 1 " in out.decode() and "│ 2 " not in out.decode()


def test_query_max_rows_defaults_to_100_for_a_table_and_everything_for_csv_and_json(bare_run):
    table = cli("query", str(bare_run), "SELECT * FROM range(150)")
    assert "│ 99 " in table.stdout and "│ 100 " not in table.stdout and "100 rows shown; the result has more" in table.stderr
    as_csv = cli("query", str(bare_run), "SELECT * FROM range(150)", "-f", "csv")
    assert as_csv.stdout.splitlines() == ["range", *map(str, range(150))] and as_csv.stderr == ""
    assert len(json.loads(cli("query", str(bare_run), "SELECT * FROM range(150)", "-f", "json").stdout)) == 150
    exact = cli("query", str(bare_run), "SELECT * FROM range(3)", "-f", "csv", "--max-rows", "3")
    assert exact.stdout.splitlines() == ["range", "0", "1", "2"] and exact.stderr == ""  # nothing left over: no note
    assert json.loads(cli("query", str(bare_run), "SELECT 1 AS n WHERE false", "-f", "json").stdout) == []
    literal = cli("query", str(bare_run), "SELECT '[bold]x[/bold]' AS v")
    assert "[bold]x[/bold]" in literal.stdout  # a value is text, not rich markup
    assert cli("query", str(bare_run), "SELECT 1 AS a, 2 AS a", "-f", "csv").stdout == "a,a\n1,2\n"  # two columns of one name


def test_query_reads_sql_from_a_file_even_one_that_starts_with_a_comment(bare_run, tmp_path):
    query = tmp_path / "numbers.sql"
    query.write_text("-- the numbers below a bound\nSELECT * FROM range($n)\n")
    from_file = cli("query", str(bare_run), f"@{query}", "-f", "csv", "-p", "n=3")
    assert from_file.stdout.splitlines() == ["range", "0", "1", "2"], from_file.stderr
    absent = tmp_path / "none.sql"
    missing = cli("query", str(bare_run), f"@{absent}")
    assert missing.returncode == 2 and missing.stderr == f"error: cannot read the query file {absent}: No such file or directory\n"
    (tmp_path / "binary.sql").write_bytes(b"\xff\xfe\x00")
    binary = cli("query", str(bare_run), f"@{tmp_path / 'binary.sql'}")
    assert binary.returncode == 2 and len(binary.stderr.splitlines()) == 1 and "cannot read the query file" in binary.stderr


def test_query_input_problems_are_one_line_errors(bare_run, s3_server, tmp_path):
    for sql in ("", "   "):
        empty = cli("query", str(bare_run), sql)
        assert empty.returncode == 2
        assert empty.stderr == 'error: the SQL argument is empty: give a query, e.g. "SELECT * FROM images LIMIT 5"\n'
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true")
    anonymous = cli("query", "s3://bucket/runs/one", "SELECT 1", "--endpoint-url", s3_server, env=env)
    assert anonymous.returncode == 2
    assert anonymous.stderr == (
        "error: cannot read s3://bucket/runs/one: no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)\n"
    )


def test_run_without_a_config_file(tmp_path, photos_dir):
    done = cli("run", "--input", str(photos_dir), "--output", str(tmp_path / "out"), "--stages", "ingest", "-q")
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "out" / "run.json").read_text())
    assert len(meta["run_id"]) == 32 and meta["engine_version"]
    assert "stages:\n- ingest" in (tmp_path / "out" / "config.yaml").read_text()
    runs = json.loads(cli("query", str(tmp_path / "out"), "SELECT run_id, status, summary_json FROM runs", "-f", "json").stdout)
    assert runs[0]["run_id"] == meta["run_id"] and runs[0]["status"] == "finished"
    assert json.loads(runs[0]["summary_json"])["stages"][0]["counts"]["images"] == 3


def test_paths_with_spaces_accents_and_brackets_run_and_are_printed_as_written(tmp_path, photos_dir):
    photos = tmp_path / "photos [draft]"  # an existing folder, not a glob
    shutil.copytree(photos_dir, photos)
    output = tmp_path / "runs" / "été #2 draft"  # Delta Lake percent-encodes these in its file list
    done = cli("run", "--input", str(photos), "--output", str(output), "--stages", "ingest", "-q")
    assert done.returncode == 0, done.stderr
    assert f"{len(list(photos.iterdir()))} inputs = {len(list(photos.iterdir()))} images" in done.stderr
    assert f"query it: sam3-engine query {shlex.quote(str(output))} " in done.stderr
    counted = cli("query", str(output), "SELECT count(*) AS n FROM images", "-f", "json")
    assert json.loads(counted.stdout) == [{"n": len(list(photos.iterdir()))}], counted.stderr
    unstorable = tmp_path / "runs" / "a[1]"
    done = cli("run", "--input", str(photos), "--output", str(unstorable), "--stages", "ingest", "-q")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"error: output {str(unstorable)!r}: Delta Lake cannot store tables under a path with '[' in it; choose another name"
    )
    assert not unstorable.exists()
    markup = tmp_path / "[/x] [bold]"
    done = cli("report", str(markup))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert str(markup) in done.stderr


def test_bad_config_is_reported_not_raised(tmp_path, photos_dir):
    path = tmp_path / "c.yaml"
    path.write_text("ingest:\n  workerz: 2\n")
    done = cli("run", str(path))
    assert done.returncode == 2 and "ingest.workerz: unknown key" in done.stderr and "Traceback" not in done.stderr
    done = cli("run", "--output", str(tmp_path / "o"))
    assert done.returncode == 2 and "needs an input" in done.stderr
    assert not (tmp_path / "o").exists(), "a config error must not leave a run directory behind"
    done = cli("run", "--input", str(tmp_path / "nothing-here"), "--output", str(tmp_path / "o"), "--stages", "ingest")
    assert done.returncode == 2 and "does not exist" in done.stderr
    # A folder has no captions: with no phrases configured either, there is nothing to ask SAM 3.
    done = cli(
        "run",
        "--input",
        str(photos_dir),
        "--output",
        str(tmp_path / "p"),
        "--model",
        "tiny-random",
        "--stages",
        "ingest,mine,negatives,propose",
    )
    assert done.returncode == 2 and "has no phrases" in done.stderr and "mine.phrases" in done.stderr


def test_every_command_has_help():
    for command in ([], ["run"], ["query"], ["tables"], ["validate"], ["report"]):
        done = cli(*command, "--help")
        assert done.returncode == 0 and "Usage" in done.stdout, command
    assert "image_id" in cli("tables", "images").stdout
    assert "unit_size: 2" in cli("validate", str(REPO / "examples" / "quickstart.yaml")).stdout


def test_quickstart_verifies_every_pair_and_mask_and_verdicts_retune_in_sql(quickstart):
    run_dir, done = quickstart
    sql = (
        "SELECT verifier, (SELECT count(*) FROM pairs) AS pairs, count(*) AS judged_pairs, "
        "(SELECT count(*) FROM masks) AS masks, "
        "(SELECT count(*) FROM mask_verifications AS m WHERE m.verifier = v.verifier) AS judged_masks, "
        "(SELECT count(*) FROM mask_verifications AS m WHERE m.verifier = v.verifier AND verdict = 'reject') AS rejected "
        "FROM pair_verifications AS v GROUP BY verifier ORDER BY verifier"
    )
    by_verifier = json.loads(cli("query", str(run_dir), sql, "-f", "json").stdout)
    assert [counts["verifier"] for counts in by_verifier] == ["sam3-clip", "vlm"]  # the quickstart runs both verifiers
    for counts in by_verifier:
        assert counts["pairs"] == counts["judged_pairs"] > 0 and counts["masks"] == counts["judged_masks"] > 0
    assert by_verifier[0]["rejected"] > 0  # random masks overlap and fall apart
    lenient = "SELECT count(*) AS n FROM mask_verdicts(reject_reasons := $none) WHERE verdict = 'reject'"
    assert json.loads(cli("query", str(run_dir), lenient, "-f", "json", "-p", "none=[]").stdout) == [{"n": 0}]
    assert "NOT REAL CLIP" in done.stderr


def test_calibrate_fits_thresholds_to_labels(quickstart, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(quickstart[0], run_dir)  # it imports labels: the module's run stays as the quickstart left it
    # Labels from a rule the run's own signals can learn: present when SAM 3's presence is high, good when the mask is large.
    labelled = json.loads(
        cli(
            "query", str(run_dir), "SELECT pair_id, presence_score >= median(presence_score) OVER () AS present FROM pairs", "-f", "json"
        ).stdout
    )
    masks = json.loads(
        cli(
            "query", str(run_dir), "SELECT mask_id, area_fraction >= median(area_fraction) OVER () AS good FROM mask_scores", "-f", "json"
        ).stdout
    )
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(row) + "\n" for row in labelled + masks))
    written = tmp_path / "thresholds.yaml"
    done = cli("calibrate", str(run_dir), "--labels", str(labels), "-t", "0.95", "-w", str(written), "-f", "json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["labels"]["matched"] == {"pairs": len(labelled), "masks": len(masks)}
    fits = {(f["signal"], f["config_key"]): f for f in report["signals"]}
    sam = fits[("sam_presence", None)]
    assert sam["precision"] >= 0.95 and sam["recall"] == 1.0  # the rule is SAM 3's presence itself: perfectly learnable
    area = fits[("area_fraction", "min_area_fraction")]
    assert area["precision"] >= 0.95 and area["recall"] == 1.0 and area["labelled"] == len(masks)
    thresholds = yaml.safe_load(written.read_text())["verify"]
    assert thresholds["min_area_fraction"] == pytest.approx(area["threshold"])
    verdicts = {v["verdict"]: v for v in report["verdicts"]}
    assert verdicts["verdict=accept"]["labelled"] == len(masks)
    table = cli("calibrate", str(run_dir), "--labels", str(labels), "-t", "0.95", env={**os.environ, "COLUMNS": "80"}).stdout
    assert max(len(line) for line in table.splitlines()) <= 80 and "…" not in table  # wrapped, never cut
    assert all(f"({f['config_key']})" in table and _number(f["threshold"]) in table for f in report["signals"] if f["config_key"])
    vlm_written = tmp_path / "vlm-thresholds.yaml"
    vlm = cli("calibrate", str(run_dir), "--labels", str(labels), "--verifier", "vlm", "-t", "0.5", "-w", str(vlm_written))
    assert vlm.returncode == 0, vlm.stderr
    assert list(yaml.safe_load(vlm_written.read_text())) == ["verify_vlm"]
    assert "merge its verify_vlm section into the config and run `--stages verify_vlm`" in " ".join(vlm.stderr.split())
    stored = cli("import-labels", str(run_dir), "--labels", str(labels), "--verifier", "labeller-1")
    assert stored.returncode == 0 and f"{len(labelled)} pair and {len(masks)} mask labels stored; 0 labels name no pair" in stored.stderr
    counts = json.loads(
        cli("query", str(run_dir), "SELECT count(*) AS n FROM pair_verifications WHERE verifier = 'labeller-1'", "-f", "json").stdout
    )
    assert counts == [{"n": len(labelled)}]
    # the README's mixed layout as pandas writes it: 1/0 columns with blank cells become floats (1.0, NaN)
    as_floats = tmp_path / "floats.parquet"
    mixed = [{"pair_id": r["pair_id"], "present": float(r["present"]), "mask_id": None, "good": float("nan")} for r in labelled]
    mixed += [{"pair_id": None, "present": float("nan"), "mask_id": r["mask_id"], "good": float(r["good"])} for r in masks]
    pq.write_table(pa.Table.from_pylist(mixed), as_floats)
    stored = cli("import-labels", str(run_dir), "--labels", str(as_floats), "--verifier", "labeller-2")
    assert stored.returncode == 0 and f"{len(labelled)} pair and {len(masks)} mask labels stored" in stored.stderr, stored.stderr
    same = "SELECT verifier, list(presence ORDER BY pair_id) AS said FROM pair_verifications WHERE verifier LIKE 'labeller-%' GROUP BY 1"
    first, second = json.loads(cli("query", str(run_dir), same + " ORDER BY 1", "-f", "json").stdout)
    assert first["said"] == second["said"]
    verdicts = "SELECT verifier, count(*) AS n FROM mask_verifications GROUP BY 1 ORDER BY 1"
    before = cli("query", str(run_dir), verdicts, "-f", "json").stdout
    for machine in ("sam3-clip", "vlm"):  # people's labels under a machine's name would replace its verdicts
        refused = cli("import-labels", str(run_dir), "--labels", str(labels), "--verifier", machine)
        assert refused.returncode == 2 and "is a machine verifier of this run" in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert cli("query", str(run_dir), verdicts, "-f", "json").stdout == before
    bad = tmp_path / "bad.csv"
    bad.write_text("image,label\nx,1\n")
    refused = cli("calibrate", str(run_dir), "--labels", str(bad))
    assert refused.returncode == 2 and "labels need pair_id" in refused.stderr
    unwritable = cli("calibrate", str(run_dir), "--labels", str(labels), "-w", str(bad / "t.yaml"))
    assert unwritable.returncode == 2 and unwritable.stderr == f"error: cannot write --write {bad / 't.yaml'}: Not a directory\n"
    (tmp_path / "folder.csv").mkdir()
    folder = cli("import-labels", str(run_dir), "--labels", str(tmp_path / "folder.csv"))
    assert folder.returncode == 2 and len(folder.stderr.splitlines()) == 1
    assert f"Is a directory: '{tmp_path / 'folder.csv'}'" in folder.stderr


def test_quickstart_runs_on_to_splits_export_and_eval(quickstart, tmp_path):
    from pycocotools.coco import COCO

    run_dir, done = quickstart
    splits = json.loads(cli("query", str(run_dir), "SELECT tier, count(*) AS n FROM splits GROUP BY ALL", "-f", "json").stdout)
    pairs = json.loads(cli("query", str(run_dir), "SELECT count(*) AS n FROM pairs", "-f", "json").stdout)[0]["n"]
    assert sum(s["n"] for s in splits) == pairs  # every verified pair has a place: a tier or an exclusion reason
    # Gold without a person: the two verifiers (CLIP, VLM) agree on some pairs; with tiny-random models the summary says what it is worth
    assert any(s["tier"] == "gold" for s in splits) and "gold_from_random_weights" in done.stderr
    exported = json.loads(
        cli(
            "query",
            str(run_dir),
            "SELECT split, count(*) AS n FROM splits WHERE tier <> 'excluded' GROUP BY ALL ORDER BY n DESC",
            "-f",
            "json",
        ).stdout
    )
    assert exported, "the quickstart's verdicts put some pairs in a split"
    split = exported[0]["split"]
    for fmt, name in (("saco", "out.json"), ("coco", "coco.json"), ("parquet", "out.parquet")):
        written = cli("export", str(run_dir), "--split", split, "--format", fmt, "--out", str(tmp_path / name))
        assert written.returncode == 0, written.stderr
        assert f"{exported[0]['n']} pairs" in written.stderr
    saco = sorted(tmp_path.glob("out*.json"))  # out.json, or out_a.json, out_b.json when Gold has two sources (both verifiers)
    assert saco and all(COCO(str(path)).dataset["images"] for path in saco)
    COCO(str(tmp_path / "coco.json"))
    scored = cli("eval", str(run_dir), "--split", split, "--tier", "all")
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["pairs"] == exported[0]["n"]
