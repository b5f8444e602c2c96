"""The local stack (S3, MLflow server, Ray head on 127.0.0.1): `python -m infra.local --help`.

config: state dir and ports; processes: process groups we own; services: one class per
service (ray_services: the Ray head and worker nodes); stack: up/down/status; s3: the S3
server on its own, for tests and benchmarks.
"""
