"""Prometheus metrics and OpenTelemetry spans of the compute server."""
