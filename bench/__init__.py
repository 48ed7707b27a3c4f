"""`make bench`: the gateway measured beside CNCF distribution's proxy mode and nginx.

Run as `python -m bench` (full, writes BENCHMARKS.md) or `python -m bench --quick`;
`--baseline REV` (`make bench BASELINE=REV`) also runs the gateway at REV beside this tree.
Everything listens on 127.0.0.1 and every process started here is stopped here.
"""
