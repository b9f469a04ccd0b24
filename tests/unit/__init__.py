"""Unit tier: starts no process (tests/unit/conftest.py refuses any); under a minute on 2 cores."""
