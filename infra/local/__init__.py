"""Local development stack: S3 (moto), Ray head, MLflow server helpers."""
