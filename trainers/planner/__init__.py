"""The layout planner: memory and communication of every training-fleet layout (docs/PLANNER.md)."""
