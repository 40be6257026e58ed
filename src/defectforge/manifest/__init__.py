"""Manifests: the Parquet schema, reading and writing (``io``), path safety (``paths``) and validation
(Great Expectations)."""
