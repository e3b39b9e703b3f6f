"""Scaling influence to large corpora: candidate filtering and query batching (METHOD.md §4-§5)."""
