"""Deploy Reactor: event-driven release orchestrator for mixed fleets."""

__version__ = "0.1.0"
