"""Arrow schemas of the engine's tables and the SQL queries over them."""
