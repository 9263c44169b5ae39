"""Pipeline stages: each reads tables and writes tables, and knows nothing of scheduling."""
