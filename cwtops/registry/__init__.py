"""MLflow: the tracking server, registered versions and their lineage, the promotion policy."""
