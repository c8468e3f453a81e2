"""Stored layouts: pure geometry (regions, record indices) plus a codec that packs on register and unpacks on load."""
