"""Tests (a regular package: a dependency, autofaiss, installs a top-level `tests` package)."""
