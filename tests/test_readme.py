"""The README documents what exists: every table column, config key and reject reason."""

from sam3_engine.engine.config import (
    MASK_REASONS, ClipConfig, IngestConfig, MineConfig, ModelConfig, NegativesConfig, ProposeConfig, RetrieveConfig, RunConfig, StorageConfig,
    SplitsConfig, VerifyConfig,
)
from sam3_engine.schemas.tables import TABLES
from sam3_engine.stages.ingest import REASONS
from sam3_engine.stages.embed import REASONS as EMBED_REASONS
from sam3_engine.stages.mine import REASONS as MINE_REASONS
from sam3_engine.stages.propose import REASONS as PROPOSE_REASONS
from sam3_engine.stages.verify import REASONS as VERIFY_REASONS
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_every_table_and_column_is_documented():
    for spec in TABLES.values():
        assert f"### `{spec.name}` (schema v{spec.version})" in README
        for column in spec.columns:
            assert f"`{column.name}`" in README, (spec.name, column.name)


def test_every_config_key_and_reject_reason_is_documented():
    for prefix, model in (("", RunConfig), ("ingest.", IngestConfig), ("model.", ModelConfig), ("mine.", MineConfig), ("clip.", ClipConfig), ("retrieve.", RetrieveConfig), ("negatives.", NegativesConfig), ("propose.", ProposeConfig), ("verify.", VerifyConfig), ("splits.", SplitsConfig), ("storage.", StorageConfig)):
        for name, field in model.model_fields.items():
            if field.description:
                assert f"`{prefix}{name}`" in README, prefix + name
    for reason in {**REASONS, **MINE_REASONS, **EMBED_REASONS, **PROPOSE_REASONS, **VERIFY_REASONS}:
        assert f"| `{reason}` |" in README, reason
    for reason in MASK_REASONS:
        assert f"| `{reason}` |" in README, reason


def test_the_two_setup_commands_are_there():
    assert "pip install -e . && sam3-engine run examples/quickstart.yaml" in README
    assert "pip install -e '.[test]' && pytest" in README
    assert "pip install -e '.[test]' && pytest" in (REPO / ".ci" / "run").read_text()


def test_every_verdict_and_reason_code_is_documented():
    import re

    from sam3_engine.engine.catalog import named_query

    code = "\n".join(line for line in named_query("verdicts").splitlines() if not line.lstrip().startswith("--"))
    codes = set(re.findall(r"'([a-z_]+)'", code))
    assert {"covered", "uncovered_foreground", "signals_agree", "too_small", "unknown"} <= codes
    for code in codes:
        assert f"`{code}`" in README, code


def test_every_split_reason_is_documented():
    from sam3_engine.engine.catalog import named_query

    sql = named_query("splits")
    literal = {"sources_disagree", "unconfirmed", "negative_cap", "positive_with_rejected_masks"}
    composed = {f"{prefix}_{kind}" for prefix in ("human", "agreeing", "single_source") for kind in ("positive", "negative")}
    assert all(f"'{code}'" in sql for code in literal) and all(f"'{code.rsplit('_', 1)[0]}_' || kind" in sql for code in composed)
    for code in literal | composed:
        assert f"`{code}`" in README, code
