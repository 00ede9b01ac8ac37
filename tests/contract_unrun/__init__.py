"""A package that must never be run: checking a preload list only looks into it."""

raise AssertionError("tests.contract_unrun was imported")
