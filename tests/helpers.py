"""Small helpers shared by the tests."""

from __future__ import annotations

from sam3_engine.app.pipeline import run_pipeline
from sam3_engine.engine import catalog
from sam3_engine.engine.config import load_config


def ingest(input_url, output, **overrides):
    """Run the ingest stage in-process; returns the RunResult."""
    config = load_config(None, {"input": str(input_url), "output": str(output), "stages": "ingest", **overrides})
    return run_pipeline(config)


def rows(run_dir, sql, params=None, **kwargs):
    return catalog.query(str(run_dir), sql, params, **kwargs).to_pylist()
