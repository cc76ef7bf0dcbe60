"""Real servers the tests start on loopback: PostgreSQL, S3, MLflow."""
