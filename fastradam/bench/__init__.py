"""The benchmark tooling: ``python -m fastradam.bench`` and the report of pytest-benchmark JSON."""
