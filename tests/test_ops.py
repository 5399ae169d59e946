"""The op layer's ``backend`` argument: names it refuses, and what "auto" picks for CPU tensors.

What the ops compute, on every backend, is tests/test_backend_contract.py; their argument contract is
tests/test_checks.py.
"""
import pytest

from amp_fused import available_backends, backends, functional


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'reference', 'foreach'"):
        functional.restore_([], [], backend="numpy")


def test_auto_resolves_to_an_available_backend_for_cpu():
    chosen = backends.resolve("auto", "cpu")
    assert chosen.NAME in available_backends("cpu") and chosen.NAME != "reference"
