"""The backend contract (tests/test_backend_contract.py) on the Triton backend, under Triton's interpreter.

The contract tests are imported as they are; the parametrisation that module's ``pytest_generate_tests``
reads from the collecting module is set here: backend "triton", on CPU tensors (the interpreter) and on CUDA
tensors (marked ``cuda``: skipped without a GPU). The interpreter runs each program in Python, a few tens of
milliseconds per 4096-element chunk, so the many-tensors test stops at 37 tensors here (the main process
runs 300 on the other backends; tests/triton/test_triton_ops.py covers more tensors than one scale-pass
block holds).
"""
from test_backend_contract import *  # noqa: F401,F403 - the contract tests, collected here
from test_backend_contract import contract_cases

BACKEND_CASES = contract_cases(["triton"], ["triton"])
TENSOR_COUNTS = (1, 2, 37)
