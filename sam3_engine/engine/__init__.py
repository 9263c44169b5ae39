"""Run orchestration, storage, the DuckDB catalog and the CLI: everything that schedules or stores."""
