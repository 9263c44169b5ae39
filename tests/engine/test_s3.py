"""s3:// input and output against a real S3 protocol server on loopback (moto in server mode)."""

import json
import subprocess
import sys

import boto3
import pytest

from sam3_engine.app.pipeline import run_pipeline
from sam3_engine.engine.config import StorageConfig, load_config
from tests.helpers import rows


@pytest.fixture()
def bucket(s3_server, photos_dir, request):
    client = boto3.client("s3", endpoint_url=s3_server)
    name = f"bucket-{request.node.name.replace('_', '-')[:40].lower()}"
    client.create_bucket(Bucket=name)
    for photo in sorted(photos_dir.glob("*.jpg")):
        client.upload_file(str(photo), name, f"photos/{photo.name}")
    client.put_object(Bucket=name, Key="photos/copy/truck.jpg", Body=(photos_dir / "truck.jpg").read_bytes())
    client.put_object(Bucket=name, Key="photos/broken.jpg", Body=b"\xff\xd8\xff\xe0 not really a jpeg")
    manifest = "\n".join(
        json.dumps({"uri": f"photos/{p.name}", "caption": f"caption of {p.stem}"}) for p in sorted(photos_dir.glob("*.jpg"))
    )
    client.put_object(Bucket=name, Key="manifest.jsonl", Body=(manifest + "\n" + json.dumps({"uri": "photos/gone.jpg"})).encode())
    return name


def test_s3_folder_in_s3_run_directory_out(bucket, s3_server):
    config = load_config(
        None,
        {"input": f"s3://{bucket}/photos/", "output": f"s3://{bucket}/runs/one", "storage.endpoint_url": s3_server, "stages": "ingest"},
    )
    result = run_pipeline(config)
    storage = StorageConfig(endpoint_url=s3_server)
    images = rows(f"s3://{bucket}/runs/one", "SELECT uris, width, height FROM images ORDER BY width", storage_config=storage)
    assert [(i["width"], i["height"]) for i in images] == [(800, 534), (1280, 720), (1800, 1200)]
    assert images[-1]["uris"] == [f"s3://{bucket}/photos/copy/truck.jpg", f"s3://{bucket}/photos/truck.jpg"]
    assert rows(f"s3://{bucket}/runs/one", "SELECT reason FROM rejects", storage_config=storage) == [{"reason": "truncated"}]
    assert result.stages[0].counts["duplicates"] == 1

    client = boto3.client("s3", endpoint_url=s3_server)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="runs/one/")["Contents"]}
    assert {"runs/one/run.json", "runs/one/config.yaml"} <= keys
    assert any(k.startswith("runs/one/tables/images/_delta_log/") for k in keys)

    again = run_pipeline(config)
    assert again.stages[0].units_committed == 0 and again.run_id == result.run_id


def test_s3_manifest_and_query_cli(bucket, s3_server):
    config = load_config(
        None,
        {
            "input": f"s3://{bucket}/manifest.jsonl",
            "output": f"s3://{bucket}/runs/two",
            "storage.endpoint_url": s3_server,
            "stages": "ingest",
        },
    )
    run_pipeline(config)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sam3_engine",
            "query",
            f"s3://{bucket}/runs/two",
            "SELECT uri, captions FROM images ORDER BY uri",
            "--format",
            "json",
            "--endpoint-url",
            s3_server,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    images = json.loads(out.stdout)
    assert [i["uri"] for i in images] == [f"s3://{bucket}/photos/{n}" for n in ("groceries.jpg", "test_image.jpg", "truck.jpg")]
    assert images[0]["captions"] == ["caption of groceries"]
    missing = rows(f"s3://{bucket}/runs/two", "SELECT uri, reason FROM rejects", storage_config=StorageConfig(endpoint_url=s3_server))
    assert missing == [{"uri": f"s3://{bucket}/photos/gone.jpg", "reason": "missing"}]


def test_the_coverage_report_of_a_run_on_s3(bucket, s3_server, tmp_path):
    run_url = f"s3://{bucket}/runs/report"
    options = {"input": f"s3://{bucket}/manifest.jsonl", "output": run_url, "storage.endpoint_url": s3_server, "stages": "ingest,mine"}
    run_pipeline(load_config(None, options))
    out = tmp_path / "report.html"
    command = [sys.executable, "-m", "sam3_engine", "report", run_url, "-o", str(out), "--endpoint-url", s3_server]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    asked = subprocess.run(
        [
            sys.executable,
            "-m",
            "sam3_engine",
            "query",
            run_url,
            "SELECT count(DISTINCT concept_id) AS n FROM candidates",
            "-f",
            "json",
            "--endpoint-url",
            s3_server,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    concepts = json.loads(asked.stdout)[0]["n"]
    assert concepts > 0 and f"{concepts} concepts; not yet in the run: pairs, pair_verifications" in done.stderr
    assert "run the <code>propose</code> stage" in out.read_text()
