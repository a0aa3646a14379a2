"""Test helpers shipped with the package (golden-vector runner, tiny fixtures)."""
