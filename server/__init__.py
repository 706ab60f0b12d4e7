"""Flower ServerApp, strategy, pooled statistics and MLflow tracking."""
