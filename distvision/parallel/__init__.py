"""Distributed parts: launching workers, synchronising them."""
