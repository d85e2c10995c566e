"""Tests against the test Kubernetes cluster (tests/infra/k8s.py)."""
