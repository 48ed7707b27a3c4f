"""`make bench`: the gateway measured beside CNCF distribution's proxy mode and nginx.

Run as `python -m bench` (full, writes BENCHMARKS.md) or `python -m bench --quick`.
Everything listens on 127.0.0.1 and every process started here is stopped here.
"""
