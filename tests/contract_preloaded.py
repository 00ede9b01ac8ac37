"""Imported by no task: a Supervisor preloads it (tests/test_contract.py)."""
