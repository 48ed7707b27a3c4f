"""Fault tests: the gateway under injected upstream faults (issue #5)."""
