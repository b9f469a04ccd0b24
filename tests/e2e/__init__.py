"""End-to-end tier: real worker processes, launchers and servers; every test is marked slow."""
