"""Simulated fleets on one machine: ``fedmq demo`` and ``fedmq bench`` (docs/benchmarks.md)."""

__all__: list[str] = []
