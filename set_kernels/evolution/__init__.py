"""Sparse topology evolution: :class:`SET` (prune and regrow, random or gradient-driven)."""
from .set import PRUNE, REGROW, SCHEDULES, SET

__all__ = ["PRUNE", "REGROW", "SCHEDULES", "SET"]
