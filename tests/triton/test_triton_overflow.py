"""tests/test_overflow.py's cases on the Triton backend (under Triton's interpreter on CPU tensors; compiled on
CUDA tensors when a GPU is visible): with inner_lr = 1e20 and gradients ~1 the norms stay finite."""
import pytest

from test_overflow import DTYPES, check_huge_inner_lr
from triton_cases import DEVICES


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_huge_inner_lr_keeps_finite_norms(device, dtype, per_tensor):
    check_huge_inner_lr("triton", dtype, per_tensor, device=device)
