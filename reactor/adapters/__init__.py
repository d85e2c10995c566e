"""Adapters: the real and the in-memory implementations of the ports."""
