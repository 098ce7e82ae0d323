"""Flows: the Prefect DAG and the `colorize` CLI."""
