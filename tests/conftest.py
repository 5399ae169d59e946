import os

import pytest
import torch

# The Triton tests run under Triton's interpreter, which must be switched on before triton is imported:
# they run in a process of their own (see the Makefile), never in the main one.
collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["triton"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is visible")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
