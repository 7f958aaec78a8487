"""Params, derived settings, artifact paths, atomic writes, S3 locations and errors."""
