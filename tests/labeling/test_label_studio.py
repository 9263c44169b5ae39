"""The round trip through a real Label Studio: push a selection, answer as an annotator would, pull, then splits."""

import hashlib
import os
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from sam3_engine.app.pipeline import run_pipeline
from sam3_engine.engine.catalog import connect, named_query
from sam3_engine.engine.config import load_config
from sam3_engine.engine.store import TableStore
from sam3_engine.labeling.answers import push_lock
from sam3_engine.labeling.label_studio import LABEL_CONFIG, project_title
from sam3_engine.labeling.masks import bitmap_to_brush, brush_to_bitmap, coco_to_bitmap, polygon_to_bitmap
from tests.helpers import rewrite, rows


def _cli(*args, token=None):
    env = {**os.environ, "LABEL_STUDIO_API_KEY": token or ""}
    return subprocess.run([sys.executable, "-m", "sam3_engine", *args], capture_output=True, text=True, env=env)


@pytest.fixture()
def pushed(quickstart, label_studio, tmp_path):
    """A copy of the quickstart whose photos lie below the server's files root, every pair selected and pushed."""
    url, token, files_root = label_studio
    run = tmp_path / "run"
    shutil.copytree(quickstart[0], run)
    photos = Path(files_root) / tmp_path.name
    photos.mkdir()
    images = rows(run, "SELECT image_id, uri FROM images")
    for image in images:
        shutil.copyfile(image["uri"], photos / Path(image["uri"]).name)
    rewrite(run, "images", "uri", "image_id", {i["image_id"]: str(photos / Path(i["uri"]).name) for i in images})
    assert _cli("select", str(run), "-n", "100", "--name", "round-1", "--max-pairs-per-image", "100").returncode == 0
    done = _cli("labeling", "push", str(run), "--selection", "round-1", "--url", url, "--files-root", str(files_root), token=token)
    assert done.returncode == 0, done.stderr
    assert f"{len(images)} tasks created, 0 already there" in done.stderr
    return run, url, token, files_root


def _client(url, token):
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=url, api_key=token)


def _brush(bitmap, phrase, result_id):
    height, width = bitmap.shape
    return {
        "id": result_id,
        "from_name": "mask",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": width,
        "original_height": height,
        "value": {"format": "rle", "rle": bitmap_to_brush(bitmap), "brushlabels": [phrase]},
    }


def _polygon(points, phrase, result_id, size):
    height, width = size
    return {
        "id": result_id,
        "from_name": "outline",
        "to_name": "image",
        "type": "polygonlabels",
        "original_width": width,
        "original_height": height,
        "value": {"points": points, "closed": True, "polygonlabels": [phrase]},
    }


def test_push_pull_and_splits_make_the_answered_pairs_gold_with_the_persons_masks(pushed):
    run, url, token, files_root = pushed
    again = _cli("labeling", "push", str(run), "--selection", "round-1", "--url", url, "--files-root", str(files_root), token=token)
    images = rows(run, "SELECT count(*) AS n FROM images")[0]["n"]
    assert again.returncode == 0 and f"0 tasks created, {images} already there" in again.stderr  # pushing twice: no duplicates
    client = _client(url, token)
    (project,) = [p for p in client.projects.list() if p.title == project_title(TableStore(str(run)), "round-1")]
    tasks = list(client.tasks.list(project=project.id, fields="all"))
    assert len(tasks) == images and all(t.data["engine_selection"] == "round-1" for t in tasks)

    multi = rows(
        run,
        "SELECT pair_id, image_id, phrase FROM pairs WHERE instance_count >= 2 ORDER BY instance_count DESC, pair_id LIMIT 1",
    )[0]
    task = next(t for t in tasks if t.data["engine_image_id"] == multi["image_id"])
    other = next(phrase for phrase, pair in task.data["engine_pairs"].items() if pair != multi["pair_id"])
    (prediction,) = client.predictions.list(task=task.id)
    engine = [r for r in prediction.result if r["value"]["brushlabels"] == [multi["phrase"]]]
    assert len(engine) >= 2
    sql = "SELECT mask_id, height, width, rle_counts FROM masks WHERE pair_id = $p"
    masks = {m["mask_id"]: m for m in rows(run, sql, {"p": multi["pair_id"]})}
    kept = engine[0]
    kept_bitmap = coco_to_bitmap(masks[kept["id"]]["rle_counts"], kept["original_height"], kept["original_width"])
    assert np.array_equal(brush_to_bitmap(kept["value"]["rle"], kept["original_height"], kept["original_width"]), kept_bitmap)
    drawn = np.zeros_like(kept_bitmap)
    drawn[100:300, 200:650] = True
    drawn[310, 700] = True  # a lone pixel: any loss in the codec would show
    absent = {"id": "absent-1", "from_name": "absent", "to_name": "image", "type": "choices", "value": {"choices": [other]}}
    outline = [[60.0, 60.0], [90.0, 60.0], [75.5, 95.0]]  # percent of the width and height, as the polygon tool writes them
    polygon = _polygon(outline, multi["phrase"], "outline-1", drawn.shape)
    answer = client.annotations.create(task.id, result=[kept, _brush(drawn, multi["phrase"], "drawn-1"), polygon, absent], lead_time=42.5)

    done = _cli("labeling", "pull", str(run), "--selection", "round-1", "--url", url, token=token)
    assert done.returncode == 0, done.stderr
    labels = {r["phrase"]: r for r in rows(run, "SELECT * FROM human_labels WHERE selection = 'round-1'")}
    assert set(labels) == {multi["phrase"], other}  # the other pairs have no answer: pending
    assert labels[multi["phrase"]]["present"] and labels[multi["phrase"]]["kept_mask_ids"] == [kept["id"]]
    assert sorted(labels[multi["phrase"]]["dropped_mask_ids"]) == sorted(set(masks) - {kept["id"]})
    assert labels[other]["present"] is False and labels[multi["phrase"]]["lead_time_s"] == 42.5
    assert labels[other]["annotation_id"] == str(answer.id)
    human_mask, outlined = rows(run, "SELECT * FROM human_masks ORDER BY area DESC")
    assert np.array_equal(coco_to_bitmap(human_mask["rle_counts"], *drawn.shape), drawn)  # bit for bit
    assert human_mask["area"] == int(drawn.sum()) and human_mask["pair_id"] == outlined["pair_id"] == multi["pair_id"]
    height, width = drawn.shape
    in_pixels = [(x * width / 100, y * height / 100) for x, y in outline]
    assert np.array_equal(coco_to_bitmap(outlined["rle_counts"], height, width), polygon_to_bitmap(in_pixels, height, width))

    before = rows(run, "SELECT * FROM human_labels ORDER BY pair_id")
    assert _cli("labeling", "pull", str(run), "--selection", "round-1", "--url", url, token=token).returncode == 0
    assert rows(run, "SELECT * FROM human_labels ORDER BY pair_id") == before  # pulling twice: the same rows
    assert rows(run, "SELECT count(*) AS n FROM human_masks") == [{"n": 2}]
    bundle = run.parent / "cvat"  # the same selection out to CVAT too: pulling its untouched export keeps Label Studio's answers
    assert _cli("labeling", "push", str(run), "--selection", "round-1", "--to", "cvat", "--out", str(bundle)).returncode == 0
    done = _cli("labeling", "pull", str(run), "--selection", "round-1", "--from", "cvat", "--in", str(bundle / "annotations.xml"))
    assert done.returncode == 0 and "0 pairs answered" in done.stderr, done.stderr
    assert rows(run, "SELECT * FROM human_labels ORDER BY pair_id") == before
    assert rows(run, "SELECT count(*) AS n FROM human_masks") == [{"n": 2}]

    run_pipeline(load_config(None, {"output": str(run), "stages": "splits"}))
    tiers = {r["pair_id"]: r for r in rows(run, "SELECT pair_id, tier, kind, sources FROM splits")}
    pair_of_other = task.data["engine_pairs"][other]
    assert (tiers[multi["pair_id"]]["tier"], tiers[multi["pair_id"]]["kind"]) == ("gold", "positive")
    assert (tiers[pair_of_other]["tier"], tiers[pair_of_other]["kind"]) == ("gold", "negative")
    assert tiers[multi["pair_id"]]["sources"] == ["label-studio"]
    con = connect(str(run))
    try:  # the export's Gold masks of the pair are the person's answer: the mask kept and the mask drawn
        con.execute(named_query("export"))
        split = rows(run, "SELECT split FROM splits WHERE pair_id = $p", {"p": multi["pair_id"]})[0]["split"]
        sql = "SELECT mask_id, rle_counts FROM export_masks($split, ['gold'], 1) WHERE pair_id = $p"
        exported = dict(con.sql(sql, params={"split": split, "p": multi["pair_id"]}).fetchall())
    finally:
        con.close()
    person = {kept["id"]: masks[kept["id"]]["rle_counts"]} | {m["mask_id"]: m["rle_counts"] for m in (human_mask, outlined)}
    assert exported == person

    client.annotations.update(answer.id, result=[kept, absent])  # the person changes their mind in the tool
    assert _cli("labeling", "pull", str(run), "--selection", "round-1", "--url", url, token=token).returncode == 0
    assert rows(run, "SELECT count(*) AS n FROM human_masks") == [{"n": 0}]
    assert rows(run, "SELECT drawn_masks FROM human_labels WHERE pair_id = $p", {"p": multi["pair_id"]}) == [{"drawn_masks": 0}]

    answered = rows(run, "SELECT * FROM human_labels ORDER BY pair_id")
    client.tasks.delete(str(task.id))  # the task is deleted in the tool: what was pulled from it stays
    done = _cli("labeling", "pull", str(run), "--selection", "round-1", "--url", url, token=token)
    assert done.returncode == 0 and "skipped 1 (tasks gone from the tool, earlier answers kept)" in done.stderr
    assert rows(run, "SELECT * FROM human_labels ORDER BY pair_id") == answered
    again = _cli("labeling", "push", str(run), "--selection", "round-1", "--url", url, "--files-root", str(files_root), token=token)
    assert again.returncode == 0 and f"1 tasks created, {images - 1} already there" in again.stderr
    done = _cli("labeling", "pull", str(run), "--selection", "round-1", "--url", url, token=token)  # the new task has no answer yet
    assert done.returncode == 0 and "skipped 1 (tasks gone from the tool, earlier answers kept)" in done.stderr
    assert rows(run, "SELECT * FROM human_labels ORDER BY pair_id") == answered


def test_a_refused_token_a_down_server_and_a_bad_mask_are_one_line_answers(pushed):
    run, url, token, _ = pushed
    with _html_server() as html:
        for args, key, message in (
            (["--url", url], "wrong-token", "answered 401: check LABEL_STUDIO_API_KEY"),
            (["--url", "http://127.0.0.1:9"], token, "cannot reach Label Studio"),
            (["--url", url], "", "set LABEL_STUDIO_API_KEY"),
            (["--url", "http://[::1"], token, "is not an address like http://127.0.0.1:8080"),
            (["--url", url + "/api"], token, "does not look like Label Studio"),  # a 404
            (["--url", html], token, "does not look like Label Studio"),  # a web page, 200
        ):
            done = _cli("labeling", "pull", str(run), "--selection", "round-1", *args, token=key)
            assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    client = _client(url, token)
    (project,) = [p for p in client.projects.list() if p.title == project_title(TableStore(str(run)), "round-1")]
    task = max(client.tasks.list(project=project.id, fields="all"), key=lambda t: (len(t.data["engine_pairs"]), t.id))
    first, second, *_ = sorted(task.data["engine_pairs"])
    size = rows(run, "SELECT height, width FROM images WHERE image_id = $i", {"i": task.data["engine_image_id"]})[0]
    whole = np.ones((size["height"], size["width"]), bool)
    results = [
        _brush(np.ones((5, 5), bool), first, "wrong-size"),
        _brush(whole, "a phrase the tool renamed", "renamed"),
        _brush(whole, first, "painted"),  # painted and ticked absent: which is meant is unknown
        {"id": "both", "from_name": "absent", "to_name": "image", "type": "choices", "value": {"choices": [first]}},
        {"id": "one", "from_name": "absent", "to_name": "image", "type": "choices", "value": {"choices": second}},  # a string
        {"id": "box", "from_name": "box", "to_name": "image", "type": "rectanglelabels", "value": {"x": 1, "y": 1, "width": 5}},
        {"id": "list", "from_name": "mask", "to_name": "image", "type": "brushlabels", "value": [first]},
        _polygon([[1, 1], [5, 5]], first, "line", (size["height"], size["width"])),
    ]
    client.tasks.delete(str(task.id))  # as an import of the task with its annotation: the server then stores any result as is
    client.projects.import_tasks(project.id, request=[{"data": task.data, "annotations": [{"result": results}]}])
    done = _cli("labeling", "pull", str(run), "--selection", "round-1", "--url", url, token=token)
    assert done.returncode == 0, done.stderr
    for reason in (
        "mask not the image's size",
        "unknown phrase",
        "phrase both painted and ticked absent",
        "result type not supported: rectanglelabels",
        "undecodable polygon",
        "malformed result",
    ):
        assert f"skipped 1 ({reason})" in done.stderr, done.stderr
    stored = rows(run, "SELECT phrase, present FROM human_labels")  # of the answer, only the string choice is usable
    assert stored == [{"phrase": second, "present": False}]


@contextmanager
def _html_server():
    """The address of a web server that answers every request with a page of HTML, 200: not Label Studio."""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the handler's method name
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html><body>a web page</body></html>")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_long_selection_names_get_projects_of_their_own_and_a_failed_push_leaves_none(pushed, tmp_path):
    run, url, token, files_root = pushed
    client = _client(url, token)
    long = "round-2-of-the-kitchen-photos-for-the-" + "x" * 20
    first, second = long + "-a", long + "-b"  # the same first 36 characters and more
    assert _cli("select", str(run), "-n", "2", "--name", "round-1").returncode == 0  # frees the other pairs
    for name in (first, second):
        assert _cli("select", str(run), "-n", "2", "--name", name).returncode == 0

    projects = len(list(client.projects.list()))
    refused = _cli("labeling", "push", str(run), "--selection", first, "--url", url, token=token)  # no --files-root
    assert refused.returncode == 2 and "give --files-root" in refused.stderr
    assert len(list(client.projects.list())) == projects  # checked before a project is made
    pulled = _cli("labeling", "pull", str(run), "--selection", first, "--url", url, token=token)
    assert pulled.returncode == 2 and "push it first" in pulled.stderr

    store = TableStore(str(run))  # a project pushed before titles hashed the whole name is still the selection's
    legacy = client.projects.create(
        title=f"{second[:36]} ({hashlib.sha256(store.run_url.encode()).hexdigest()[:8]})",
        description=f"sam3-engine selection {second} of {store.run_url}",
        label_config=LABEL_CONFIG,
    )
    projects = len(list(client.projects.list()))
    held = push_lock(store, "label-studio", first).acquire()  # another push of this selection is under way
    push = ["labeling", "push", str(run), "--selection", first, "--url", url, "--files-root", str(files_root)]
    waiting = subprocess.Popen(
        [sys.executable, "-m", "sam3_engine", *push],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "LABEL_STUDIO_API_KEY": token},
    )
    try:
        said = waiting.stderr.readline()  # blocks until the push says it waits
        assert "waiting: this selection is being pushed to the same tool by pid" in said, said
        assert len(list(client.projects.list())) == projects  # it made no second project meanwhile
    finally:
        held.release()
    rest = waiting.communicate(timeout=300)[1]
    assert waiting.returncode == 0 and " 0 already there" in rest, rest  # the first push made the project and its tasks
    ids = [rest.split("project ")[1].split(",")[0]]
    done = _cli("labeling", "push", str(run), "--selection", second, "--url", url, "--files-root", str(files_root), token=token)
    assert done.returncode == 0 and " 0 already there" in done.stderr, done.stderr
    ids.append(done.stderr.split("project ")[1].split(",")[0])
    assert ids[0] != ids[1] and ids[1] == str(legacy.id)
    (title,) = [p.title for p in client.projects.list() if str(p.id) == ids[0]]
    assert title == project_title(store, first) and title.startswith(long[:36]) and len(title) <= 50

    # the server refuses the image folder (not below its files root): one line, and the project made for it is gone
    outside = tmp_path / "outside"
    (outside / "photos").mkdir(parents=True)
    images = rows(run, "SELECT image_id, uri FROM images")
    for image in images:
        shutil.copyfile(image["uri"], outside / "photos" / Path(image["uri"]).name)
    rewrite(run, "images", "uri", "image_id", {i["image_id"]: str(outside / "photos" / Path(i["uri"]).name) for i in images})
    assert _cli("select", str(run), "-n", "2", "--name", "round-3").returncode == 0
    projects = len(list(client.projects.list()))
    refused = _cli("labeling", "push", str(run), "--selection", "round-3", "--url", url, "--files-root", str(outside), token=token)
    assert refused.returncode == 2 and "answered 400" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert len(list(client.projects.list())) == projects
