"""Observability: ferry's metrics for Prometheus, live figures, the report."""
