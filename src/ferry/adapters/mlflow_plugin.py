"""`mlflow deployments ... -t ferry`: MLflow's deployments API over ferry's transaction."""
