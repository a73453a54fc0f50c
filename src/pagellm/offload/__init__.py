"""Offload: the policy the user declares and the pager that carries it out."""
from pagellm.offload.policy import Budget, NoOffload, OffloadPolicy, PinnedHotSet, format_size, parse_size

__all__ = ["OffloadPolicy", "NoOffload", "Budget", "PinnedHotSet", "parse_size", "format_size"]
