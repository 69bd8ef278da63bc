"""Saltpeter: a distributed cron for SaltStack fleets."""

__version__ = "2.0.0"
