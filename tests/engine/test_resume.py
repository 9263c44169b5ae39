"""Kill the run's process for real, between any two commits (the runner's fault injection), then resume."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from deltalake import DeltaTable

from sam3_engine.app.pipeline import run_pipeline
from sam3_engine.engine.config import StorageConfig, load_config
from sam3_engine.engine.runner import KILL_AFTER_COMMITS_ENV
from sam3_engine.engine.stage import content_defined_chunks
from sam3_engine.io.inputs import list_inputs
from tests.conftest import REPO
from tests.helpers import ingest, rows, run_command

TABLES = {  # every column but when, and by which attempt, a unit was committed
    "images": "SELECT * FROM images ORDER BY image_id",
    "sources": "SELECT * FROM sources ORDER BY input_id",
    "rejects": "SELECT * FROM rejects ORDER BY input_id",
    "units": "SELECT * EXCLUDE (attempt_id, committed_at) FROM units ORDER BY unit_id",
}


def _cli(input_dir, output, env_extra=None, *settings, **popen):
    env = {**os.environ, **(env_extra or {})}
    command = run_command(
        input=input_dir, output=output, workers=popen.pop("workers", 1), stages="ingest", settings=["ingest.unit_size=2", *settings]
    )
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **popen)


def _snapshot(run_dir):
    return {name: rows(run_dir, sql) for name, sql in TABLES.items()}


@pytest.fixture(scope="module")
def reference(synthetic_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = ingest(synthetic_dir, run_dir, **{"ingest.unit_size": 2, "ingest.workers": 1})
    assert result.stages[0].units_total >= 10
    return _snapshot(run_dir)


@pytest.mark.parametrize("commits", [1, 2, 3, 4, 7, 11, 20])
def test_killed_between_any_two_commits_then_resumed_gives_the_same_rows(synthetic_dir, tmp_path, reference, commits):
    env = {KILL_AFTER_COMMITS_ENV: str(commits)}
    killed = _cli(synthetic_dir, tmp_path / "run", env)
    killed.wait(120)
    assert killed.returncode == -signal.SIGKILL
    resumed = _cli(synthetic_dir, tmp_path / "run")
    output = resumed.communicate(timeout=120)[0].decode()
    assert resumed.returncode == 0, output
    assert _snapshot(tmp_path / "run") == reference
    attempts = rows(tmp_path / "run", "SELECT attempt_id, status, error FROM runs ORDER BY started_at")
    assert [a["status"] for a in attempts] == ["killed", "finished"]  # the killed attempt no longer shows as running
    assert f"when attempt {attempts[1]['attempt_id']} took the run lock" in attempts[0]["error"]


@pytest.mark.parametrize("commits", [5, 6, 9, 10, 13])
def test_killed_around_compactions_then_resumed_gives_the_same_rows(synthetic_dir, tmp_path, reference, commits):
    """Compacting every 2 commits, a kill lands right after a compaction's commit, after its vacuum, or between units:
    the resumed run still ends with exactly the rows of an uninterrupted one, in a few files."""
    compacting = ("storage.compact_every=2", "storage.vacuum_retention_hours=0")
    killed = _cli(synthetic_dir, tmp_path / "run", {KILL_AFTER_COMMITS_ENV: str(commits)}, *compacting)
    killed.wait(120)
    assert killed.returncode == -signal.SIGKILL
    resumed = _cli(synthetic_dir, tmp_path / "run", None, *compacting)
    output = resumed.communicate(timeout=120)[0].decode()
    assert resumed.returncode == 0, output
    assert _snapshot(tmp_path / "run") == reference
    sources = DeltaTable(str(tmp_path / "run" / "tables" / "sources"))
    units = len(reference["units"])
    assert len(sources.file_uris()) <= 3 < units, "compacted: a few files, not one per unit"
    on_disk = list((tmp_path / "run" / "tables" / "sources").glob("*.parquet"))
    assert len(on_disk) == len(sources.file_uris()), "vacuum (retention 0) deleted every replaced file"
    commits = list((tmp_path / "run" / "tables" / "sources" / "_delta_log").glob("*.json"))
    assert len(commits) < sources.version(), "the log was checkpointed and its older commit files deleted"


@pytest.mark.parametrize("commits", [2, 3, 5, 8])
def test_killed_inside_grouped_commits_then_resumed_gives_the_same_rows(synthetic_dir, tmp_path, reference, commits):
    """Two workers finish units while the driver commits, so units are committed in groups (one commit per table, then
    one ledger commit): a kill between a group's table commits and its ledger commit leaves several units' rows without
    ledger rows; the resumed run replaces them and ends with exactly the rows of an uninterrupted run."""
    killed = _cli(synthetic_dir, tmp_path / "run", {KILL_AFTER_COMMITS_ENV: str(commits)}, workers=2)
    killed.wait(120)
    assert killed.returncode == -signal.SIGKILL
    resumed = _cli(synthetic_dir, tmp_path / "run", None, workers=2)
    output = resumed.communicate(timeout=120)[0].decode()
    assert resumed.returncode == 0, output
    assert _snapshot(tmp_path / "run") == reference
    ledger_writes = sum(entry["operation"] == "WRITE" for entry in DeltaTable(str(tmp_path / "run" / "tables" / "units")).history())
    assert ledger_writes < len(reference["units"]), "units were committed in groups"


def test_killed_again_while_resuming_then_finished_gives_the_same_rows(synthetic_dir, tmp_path, reference):
    """SIGKILL the run, then each resumed run too, at a different commit each time (the runner's fault injection counts
    the commits of its own process: 1 is right after the resumed run's start is recorded, before any unit), then finish."""
    run_dir = tmp_path / "run"
    kill_points = [3, 1, 8, 2, 14]  # a fresh run makes ~70 commits: every process is killed before it could finish
    for commits in kill_points:
        killed = _cli(synthetic_dir, run_dir, {KILL_AFTER_COMMITS_ENV: str(commits)})
        output = killed.communicate(timeout=120)[0].decode()
        assert killed.returncode == -signal.SIGKILL, output
    final = _cli(synthetic_dir, run_dir)
    output = final.communicate(timeout=120)[0].decode()
    assert final.returncode == 0, output
    assert _snapshot(run_dir) == reference
    statuses = rows(run_dir, "SELECT status, count(*) AS n FROM runs GROUP BY status ORDER BY status")
    assert statuses == [{"status": "finished", "n": 1}, {"status": "killed", "n": len(kill_points)}]  # each found by the next


def test_a_finished_run_restarted_commits_nothing_new(synthetic_dir, tmp_path):
    first = ingest(synthetic_dir, tmp_path / "run", **{"ingest.unit_size": 4})
    again = ingest(synthetic_dir, tmp_path / "run", **{"ingest.unit_size": 4})
    assert first.run_id == again.run_id and first.attempt_id != again.attempt_id
    assert again.stages[0].units_committed == 0
    assert again.stages[0].units_skipped == first.stages[0].units_total


def _versions(run_dir):
    return {path.name: DeltaTable(str(path)).version() for path in sorted((run_dir / "tables").iterdir())}


def test_a_finished_pipeline_run_again_commits_nothing_but_its_attempt(quickstart, tmp_path):
    """The quickstart's every stage (tiny-random models, the fallback), finished, then run again: the second run adds
    its attempt's row to ``runs`` (one commit when it starts, one when it finishes) and commits nothing else, derived
    tables included. It runs on a copy of the session's quickstart run."""
    shutil.copytree(quickstart[0], tmp_path / "run")
    config = load_config(str(REPO / "examples" / "quickstart.yaml"), {"output": str(tmp_path / "run")})
    before = _versions(tmp_path / "run")
    assert {"images", "concepts", "masks", "mask_verifications", "pair_verifications", "splits"} <= set(before)
    again = run_pipeline(config)
    assert [s.units_committed for s in again.stages] == [0] * len(config.stages)
    after = _versions(tmp_path / "run")
    assert after["runs"] == before["runs"] + 2
    assert {**after, "runs": None} == {**before, "runs": None}


def test_a_changed_config_reruns_what_it_affects_and_drops_stale_rows(synthetic_dir, tmp_path):
    run_dir = tmp_path / "run"
    ingest(synthetic_dir, run_dir, **{"ingest.unit_size": 4})
    strict = ingest(synthetic_dir, run_dir, **{"ingest.unit_size": 4, "ingest.max_pixels": 250})
    assert strict.stages[0].units_removed == strict.stages[0].units_committed > 0
    too_large = rows(run_dir, "SELECT count(*) AS n FROM rejects WHERE reason = 'too_large'")[0]["n"]
    assert too_large > 0
    assert strict.stages[0].counts["images"] + strict.stages[0].counts["duplicates"] + strict.stages[0].counts["rejects"] == 44
    assert rows(run_dir, "SELECT count(*) AS n FROM sources")[0]["n"] + rows(run_dir, "SELECT count(*) AS n FROM rejects")[0]["n"] == 44
    relaxed = ingest(synthetic_dir, run_dir, **{"ingest.unit_size": 4})
    assert relaxed.stages[0].counts["images"] == 40
    assert rows(run_dir, "SELECT count(*) AS n FROM rejects WHERE reason = 'too_large'") == [{"n": 0}]


def test_adding_files_runs_only_the_new_files_units(synthetic_dir, tmp_path):
    """Content-defined chunks: the new file changes the chunk it lands in (and at most the one or two after it whose
    secondary boundaries move); every other unit is skipped. Chunk boundaries hash the full URIs, so which chunks change
    depends on where the corpus lies: the expected units are computed from the URIs listed, which makes the test the
    same wherever pytest puts tmp_path (the bound on how many change is test_chunks_are_stable_when_files_are_added's)."""
    corpus = tmp_path / "corpus"
    shutil.copytree(synthetic_dir, corpus)
    uris = lambda: [e.uri for e in list_inputs(str(corpus), "auto", StorageConfig())]  # noqa: E731
    before = list(content_defined_chunks(uris(), lambda uri: uri, 4))
    first = ingest(corpus, tmp_path / "run", **{"ingest.unit_size": 4})
    assert first.stages[0].units_total == len(before)
    (corpus / "img005-again.png").write_bytes((synthetic_dir / "img005.png").read_bytes())
    after = list(content_defined_chunks(uris(), lambda uri: uri, 4))
    changed = [chunk for chunk in after if chunk not in before]
    new_uri = str(corpus / "img005-again.png")
    assert any(new_uri in chunk for chunk in changed)
    positions = [after.index(chunk) for chunk in changed]
    assert positions == list(range(positions[0], positions[0] + len(changed)))  # one stretch, where the file landed
    second = ingest(corpus, tmp_path / "run", **{"ingest.unit_size": 4})
    assert second.stages[0].units_committed == len(changed) >= 1
    assert second.stages[0].units_skipped == len(after) - len(changed)
    assert second.stages[0].units_removed == len([chunk for chunk in before if chunk not in after])
    assert second.stages[0].counts["duplicates"] == first.stages[0].counts["duplicates"] + 1


DRIVER = """
import os, sys, time
from sam3_engine.engine.runner import ProcessExecutor
from sam3_engine.engine.stage import WorkerContext
from sam3_engine.stages.splits import SplitsConfig, SplitsStage

def pid(_):
    time.sleep(0.2)
    return os.getpid()

if __name__ == "__main__":
    pool = ProcessExecutor(2)._pool(SplitsStage(SplitsConfig()), WorkerContext(os.getcwd(), None))
    print(" ".join(str(p) for p in sorted(set(pool.map(pid, range(8))))), flush=True)
    time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, only not yet reaped
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pidfd_open is Linux's")
def test_a_killed_driver_leaves_no_pool_workers_behind(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    workers = [int(p) for p in driver.stdout.readline().split()]
    assert workers and all(_alive(p) for p in workers)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers), "pool workers outlived their driver"
