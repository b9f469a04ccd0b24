"""The problem registry: one small file per problem (see registry.py)."""

from distvision.bench.problems.registry import Problem, get_problem, list_problems, register_problem, resolve

__all__ = ["Problem", "get_problem", "list_problems", "register_problem", "resolve"]
