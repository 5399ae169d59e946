"""tests/ is on sys.path (pyproject.toml's pythonpath, for the helper modules), so where Triton is not installed
(torch's CPU-only wheels) its triton/ folder would import as a namespace package called triton, which torch
takes for Triton (torch._dynamo then fails on import). Importing this module makes `import triton` fail there as
it does elsewhere. conftest.py imports it first, and so does every test module whose functions run in spawned
processes (they inherit sys.path, not this fix). It must run before torch first asks whether triton imports
(torch caches the answer)."""
import importlib.util
import sys

_spec = importlib.util.find_spec("triton")
if _spec is not None and _spec.origin is None:  # a namespace package: the tests' folder, not Triton
    sys.modules["triton"] = None
