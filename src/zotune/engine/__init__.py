"""Execution engine: how a model's blocks are found, offloaded and scheduled."""
