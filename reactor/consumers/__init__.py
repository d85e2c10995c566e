"""Consumers: the executor worker, the rollback consumer and the Pacer. They use ports, never adapters."""
