"""Adapters over the core: the CLI, the Airflow DAG's steps, the gateway."""
