"""Simulated fleets on one machine: ``fedmq demo`` (and later ``fedmq bench``)."""

__all__: list[str] = []
