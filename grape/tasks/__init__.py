"""Local multiple-choice tasks for lm-eval, built from text on this machine (no Hub needed)."""

from grape.tasks.definitions import STDLIB_TASK, TEXT_TASK_PREFIX, local_task_dir, text_task_name, write_task
from grape.tasks.next_line import NextLineSpec, next_line_items

__all__ = [
    "STDLIB_TASK",
    "TEXT_TASK_PREFIX",
    "NextLineSpec",
    "local_task_dir",
    "next_line_items",
    "text_task_name",
    "write_task",
]
