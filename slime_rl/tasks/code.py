"""Placeholder: the code task is being written."""
