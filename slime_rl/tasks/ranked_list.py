"""Placeholder: the ranked_list task is being written."""
