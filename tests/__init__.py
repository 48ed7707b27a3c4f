"""The test suite, one package: modules are imported as `tests.<part>.<module>` and the
shared helpers as `tests.support.<module>` (the repository root is on sys.path by
pyproject's `pythonpath`), so no module is ever loaded under two names."""
