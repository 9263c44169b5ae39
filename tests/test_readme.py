"""The README documents what exists: every table column, config key and reject reason of every registered stage.

Nothing here lists stages, tables or config sections: they come from the registry, so a new stage's are checked too.
"""

from sam3_engine.engine.config import MASK_REASONS, run_config_model, sections
from sam3_engine.engine.stage import stage_class, stage_names
from sam3_engine.schemas.tables import TABLES
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_every_table_and_column_is_documented():
    """Each column in its own table's section: a name another table shares (``bbox``) does not count for this one."""
    import re

    registered = {spec.name for name in stage_names() for spec in (*stage_class(name).outputs, *stage_class(name).derived)}
    assert registered <= set(TABLES)
    for spec in TABLES.values():
        heading = f"### `{spec.name}` (schema v{spec.version})"
        assert heading in README
        section = re.split(r"^#{2,3} ", README.split(heading, 1)[1], maxsplit=1, flags=re.M)[0]
        for column in spec.columns:
            assert f"`{column.name}`" in section, (spec.name, column.name)


def test_every_config_key_and_reject_reason_is_documented():
    run_config = run_config_model()
    assert {"mine", "verify", "splits", "model", "storage"} <= set(sections(run_config))
    for prefix, model in (("", run_config), *((f"{key}.", section) for key, section in sections(run_config).items())):
        for name, field in model.model_fields.items():
            if field.description and name not in sections(run_config):
                assert f"`{prefix}{name}`" in README, prefix + name
    reasons = {reason for name in stage_names() for reason in stage_class(name).reasons}
    assert {"truncated", "caption_truncated"} <= reasons
    for reason in reasons:
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


def test_every_command_is_documented_with_a_usage_line():
    """Found from the CLI itself, so a new command or sub-command without a README example fails here."""
    import typer.main

    from sam3_engine.app.cli import app

    def commands(group, prefix):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                yield from commands(command, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}"

    found = list(commands(typer.main.get_command(app), ""))
    assert {"run", "query", "labeling push", "labeling pull"} <= set(found)
    for command in found:
        assert f"sam3-engine {command} " in README, command
