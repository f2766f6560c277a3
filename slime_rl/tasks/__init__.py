"""Synthetic tasks that the default job generates on the fly."""
