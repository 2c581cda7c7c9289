"""Logging now; metrics and health endpoints belong here too."""
