"""A submodule to preload (tests/test_contract.py): found, never imported."""
