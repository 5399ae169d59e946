"""This folder runs the Triton backend under Triton's interpreter, on CPU tensors (and on CUDA tensors when a
GPU is visible). Triton decides at import whether ``triton.jit`` compiles or interprets, so the switch is
set here, before anything imports triton; a process that imported triton without it cannot run these tests.
"""
import os
import sys

if os.environ.get("TRITON_INTERPRET") != "1":
    for module in ("triton", "amp_fused.backends.triton"):
        if module in sys.modules:
            raise RuntimeError(
                f"{module} was imported before tests/triton/conftest.py could switch on Triton's interpreter; run "
                "this folder in a process of its own: TRITON_INTERPRET=1 python -m pytest tests/triton")
    os.environ["TRITON_INTERPRET"] = "1"
