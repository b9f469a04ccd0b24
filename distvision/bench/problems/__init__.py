"""The problem registry (registry.py) and one small file per problem.

Importing a problem's file registers it, so every file is imported here: whoever imports anything
from this package (registry.py included) sees the whole suite.
"""

from distvision.bench.problems import cifar10, digits, imagefolder, parity8  # noqa: F401  (they register)
from distvision.bench.problems.registry import (
    Problem,
    get_problem,
    list_problems,
    register_family,
    register_problem,
    resolve,
)

__all__ = ["Problem", "get_problem", "list_problems", "register_family", "register_problem", "resolve"]
