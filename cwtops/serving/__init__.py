"""Triton: the server, its client, publishing, the rollout reconciler and the webhook receiver."""
