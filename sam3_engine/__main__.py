"""``python -m sam3_engine`` is the ``sam3-engine`` command."""

from sam3_engine.app.cli import main

main()
