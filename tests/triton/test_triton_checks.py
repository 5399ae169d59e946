"""tests/test_checks.py's table of bad inputs on the Triton backend (under Triton's interpreter on CPU tensors;
compiled on CUDA tensors when a GPU is visible): through the op layer it raises the contract's errors and
writes nothing, like every other backend."""
import pytest

from test_checks import CUDA_ROWS, ROWS, check_row

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_bad_input_raises_the_contract_error_and_writes_nothing(row):
    check_row(row, "triton")


@pytest.mark.cuda
@pytest.mark.parametrize("row", CUDA_ROWS, ids=str)
def test_bad_input_raises_the_contract_error_and_writes_nothing_cuda(row):
    check_row(row, "triton", device="cuda")
