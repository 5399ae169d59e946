import os

import no_triton_shadow  # noqa: F401 - first: where Triton is absent, tests/triton must not pass for it
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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: threads buy nothing there, and on a loaded machine
    OpenMP's spin-waiting makes a step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
