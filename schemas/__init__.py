"""Wire schemas: migrations, generated JSON Schemas and example messages (see generate.py)."""
