"""Manifests: the Parquet schema, reading and writing, and validation (Great Expectations)."""
