"""The arena: every registered method on the same real tasks under the same budget (see docs/arena.md)."""
from .report import aggregate, write_report
from .run import DEFAULT_TASKS, TASKS, ArenaPlan, read_records, run_arena

__all__ = ["ArenaPlan", "run_arena", "read_records", "write_report", "aggregate", "TASKS", "DEFAULT_TASKS"]
