"""Operational concerns: logging, metrics, boot-time checks."""
