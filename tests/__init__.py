"""distvision's tests: tests/unit (no process started) and tests/e2e (real processes, marked slow)."""
