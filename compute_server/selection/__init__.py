"""Scoring math of the policies: chunk scores, token sets, static importance (pure torch, no I/O)."""
