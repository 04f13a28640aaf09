"""Plain helpers shared by the test modules (fixtures live in ``tests/conftest.py``); no test module
imports another test module."""
