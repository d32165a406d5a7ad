"""The offline side: synthetic data, Lightning training, evaluation, MLflow registration, reindex."""
