"""User-side examples: task files a team writes for its own model (see docs/TASKS.md)."""
