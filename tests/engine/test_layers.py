"""The layer rule: the generic engine imports no concrete stage, model or application module."""

import ast
import subprocess
import sys
from pathlib import Path

import sam3_engine
from tests.conftest import REPO

PACKAGE = Path(sam3_engine.__file__).parent
ABOVE_THE_ENGINE = (
    "sam3_engine.app",
    "sam3_engine.dashboards",
    "sam3_engine.labeling",
    "sam3_engine.stages",
    "sam3_engine.models",
    "sam3_engine.io",
    "sam3_engine.text",
)


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_engine_imports_no_stage_model_or_application_module():
    offending = {
        f"{path.relative_to(PACKAGE)}: {module}"
        for path in sorted((PACKAGE / "engine").glob("*.py"))
        for module in imported_modules(path)
        if module.startswith(ABOVE_THE_ENGINE) or module in ("sam3_engine.app", "sam3_engine.stages", "sam3_engine.models")
    }
    assert not offending, sorted(offending)


def test_the_rule_sees_an_import_inside_a_function(tmp_path):
    source = tmp_path / "late.py"
    source.write_text("def f():\n    from sam3_engine.stages.propose import ProposeStage\n    import sam3_engine.models.sam3\n")
    assert {"sam3_engine.stages.propose", "sam3_engine.models.sam3"} <= imported_modules(source)


def test_listing_stages_and_running_an_ingest_worker_load_neither_torch_nor_ray():
    """Torch, transformers and Ray load only where a model stage runs: a CLI start, a driver that runs ingest and each
    of its pool workers stay small and fast (each worker imports the stage modules to unpickle its stage)."""
    probe = (
        "import sys; import sam3_engine.app.pipeline; from sam3_engine.engine.stage import stage_class, stage_names; "
        "stage_names(); stage_class('ingest'); print(sorted({'torch', 'ray', 'transformers', 'open_clip'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
