"""Wire schemas: generated JSON Schemas, the AsyncAPI document and example messages (see generate.py)."""
