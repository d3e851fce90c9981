"""Test-only code shared by tests/ and benchmarks/ (not shipped with the package). pytest puts tests/ on
sys.path (``pythonpath`` in pyproject.toml), so test files import these as ``helpers.NAME``."""
