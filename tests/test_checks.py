"""The ops' argument contract (amp_fused/checks.py, and its C++ twin csrc/checks.h) as one table of bad inputs.

Every row runs through ``amp_fused.functional.<op>(..., validate=True)`` on every backend, which must raise the
row's exception with the row's message and write nothing. On the backends with C++ kernels (cpu, cuda) the row
also goes straight to ``torch.ops.amp_fused.<op>``, what ``validate=False`` reaches, which must raise the same
exception type with the same message as the Python contract. tests/triton/test_triton_checks.py runs the same
table on the Triton backend.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from amp_fused import available_backends, checks, functional

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")

SIZES = [(5,), (3, 4), (2, 3, 4, 4)]  # the last one 4-d, for channels_last
NATIVE = {"cpu", "cuda"}  # backends whose kernels are torch.ops.amp_fused.* with the contract in C++
SUPPORTED = r"supported dtypes are torch.float32, torch.float64, torch.float16 and torch.bfloat16 " \
            r"\(complex tensors through torch.view_as_real\)"
SPARSE = r"; AMP supports dense \(strided\) tensors only, so sparse gradients \(e.g. nn.Embedding\(sparse=True\)\) " \
         r"are not supported"
NOT_DENSE = r"\) does not fill a dense block of memory; the ops take dense tensors only \(contiguous or a permuted " \
            r"dense layout such as channels_last\), not views that skip or repeat elements"
SHARED = r" share memory; each tensor the op writes must have memory of its own"


def make_lists(device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def make():
        return [torch.randn(s, generator=gen).to(device) for s in SIZES]

    return {"params": make(), "grads": make(), "backups": make(), "momentum_buffers": make(), "orthogonals": make()}


# -- the calls: functional argument order; the ops' flags fixed --------------------------------------------------
def perturb(lists, epsilon=0.5, inner_lr=1.0, first=True, eta=None):
    return "perturb_", (lists["params"], lists["grads"], lists["backups"], epsilon, inner_lr, True, first, False, eta)


def restore(lists):
    return "restore_", (lists["params"], lists["backups"])


def restore_sgd(lists, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-4):
    return "restore_sgd_", (lists["params"], lists["backups"], lists["grads"], lists["momentum_buffers"], lr, momentum,
                            dampening, weight_decay, False, False, False)


def perturbation(lists):
    return "perturbation", (lists["params"], lists["backups"])


def norms(lists):
    return "norms", (lists["grads"],)


def restore_orthogonal(lists):
    return "restore_orthogonal_", (lists["params"], lists["backups"], lists["grads"], lists["orthogonals"], True)


def add_orthogonal(lists, alpha=0.7):
    return "add_orthogonal_", (lists["grads"], lists["orthogonals"], alpha, False)


def python_contract(op, args):
    """The Python contract alone, on the arguments as given (no conversion of complex tensors)."""
    if op == "perturb_":
        checks.check_perturb(*args[:5], first=args[6], eta=args[8])
    elif op == "restore_":
        checks.check_restore(*args)
    elif op == "restore_sgd_":
        checks.check_restore_sgd(*args[:8])
    elif op == "norms":
        checks.check_norms(*args)
    elif op == "restore_orthogonal_":
        checks.check_restore_orthogonal(*args[:4])
    elif op == "add_orthogonal_":
        checks.check_add_orthogonal(*args[:3])
    else:
        checks.check_perturbation(*args)


def replaced(name, index, make):
    """A breakage: lists[name][index] = make(lists)."""
    def apply(lists):
        lists[name][index] = make(lists)
    return apply


def each(*breakages):
    def apply(lists):
        for b in breakages:
            b(lists)
    return apply


@dataclass
class Row:
    name: str
    call: Callable  # lists -> (op, args)
    breakage: Callable  # lists -> None, in place
    error: type
    message: str  # regex, searched in the message after the "amp_fused.<op>: " prefix
    via_functional: bool = True  # False: only straight to the contract and the torch op (complex tensors)
    native: bool = True  # False: the torch op's schema cannot take the arguments (not a tensor)
    devices: tuple = ("cpu", "cuda")

    def __str__(self):
        return self.name


def _scalar_rows():
    rows = []
    for name, call in (("epsilon", perturb), ("inner_lr", perturb), ("lr", restore_sgd), ("momentum", restore_sgd),
                       ("weight_decay", restore_sgd)):
        for bad, text in ((-1.0, "-1"), (math.nan, "nan"), (math.inf, "inf")):
            rows.append(Row(f"{name}={text}", lambda lists, call=call, name=name, bad=bad: call(lists, **{name: bad}),
                            lambda lists: None, ValueError, rf"^{name} must be a finite number >= 0, got {text}$"))
    for bad, text in ((-1.0, "-1"), (math.nan, "nan"), (math.inf, "inf")):  # the gradient-reuse step's α
        rows.append(Row(f"alpha={text}", lambda lists, bad=bad: add_orthogonal(lists, alpha=bad), lambda lists: None,
                        ValueError, rf"^alpha must be a finite number >= 0, got {text}$"))
    rows.append(Row("alpha after the lengths", lambda lists: add_orthogonal(lists, alpha=-1.0),
                    lambda lists: lists["orthogonals"].pop(), ValueError,
                    r"^orthogonals has 2 tensors but grads has 3; the lists must have the same length$"))
    rows.append(Row("alpha before the tensors", lambda lists: add_orthogonal(lists, alpha=-1.0),
                    replaced("orthogonals", 1, lambda lists: lists["orthogonals"][1].double()), ValueError,
                    r"^alpha must be a finite number >= 0, got -1$"))
    for bad, text in ((math.nan, "nan"), (-math.inf, "-inf")):
        rows.append(Row(f"dampening={text}", lambda lists, bad=bad: restore_sgd(lists, dampening=bad),
                        lambda lists: None, ValueError, rf"^dampening must be a finite number, got {text}$"))
    rows.append(Row("epsilon=1e+20 is fine but inner_lr=-0.1", lambda lists: perturb(lists, 1e20, -0.1),
                    lambda lists: None, ValueError, r"^inner_lr must be a finite number >= 0, got -0.1$"))
    for bad, text in ((-1.0, "-1"), (math.nan, "nan"), (math.inf, "inf")):  # ASAM's element weights
        rows.append(Row(f"eta={text}", lambda lists, bad=bad: perturb(lists, eta=bad), lambda lists: None, ValueError,
                        rf"^eta must be a finite number >= 0, got {text}$"))
    rows.append(Row("epsilon before eta", lambda lists: perturb(lists, epsilon=-1.0, eta=-1.0), lambda lists: None,
                    ValueError, r"^epsilon must be a finite number >= 0, got -1$"))
    rows.append(Row("eta on a later ascent", lambda lists: perturb(lists, first=False, eta=0.01), lambda lists: None,
                    ValueError, r"^eta \(ASAM's element weights\) needs first=True; the weighted ascent is one step "
                                r"from θ$"))
    rows.append(Row("eta before the tensors", lambda lists: perturb(lists, first=False, eta=0.01),
                    replaced("grads", 1, lambda lists: lists["grads"][1].double()), ValueError,
                    r"^eta \(ASAM's element weights\) needs first=True"))
    return rows


def _strided_view(shape, device):
    """A view with ``shape`` that skips every other element of its last dim."""
    return torch.zeros(*shape[:-1], 2 * shape[-1], device=device)[..., ::2]


def _bad_inputs(device="cpu"):
    def dev(lists):
        return lists["params"][0].device

    rows = [
        # 1. lengths
        Row("length", perturb, lambda lists: lists["grads"].pop(), ValueError,
            r"^grads has 2 tensors but params has 3; the lists must have the same length$"),
        Row("momentum_buffers length", restore_sgd, lambda lists: lists["momentum_buffers"].clear(), ValueError,
            r"^momentum_buffers has 0 tensors but params has 3; the lists must have the same length$"),
        Row("length before scalars", lambda lists: perturb(lists, epsilon=-1.0), lambda lists: lists["backups"].pop(),
            ValueError, r"^backups has 2 tensors but params has 3"),
        # 2. scalars (below)
        # 3a. not a tensor
        Row("not a tensor", perturb, replaced("grads", 1, lambda lists: None), TypeError,
            r"^grads\[1\] must be a torch.Tensor, got NoneType$", native=False),
        Row("params not a tensor", restore, replaced("params", 0, lambda lists: 3.0), TypeError,
            r"^params\[0\] must be a torch.Tensor, got float$", native=False),
        # 3b. sparse
        Row("sparse grad", perturb, replaced("grads", 2, lambda lists: lists["grads"][2].to_sparse()), TypeError,
            r"^grads\[2\] has layout torch.sparse_coo" + SPARSE + "$"),
        Row("sparse grad, restore_sgd_", restore_sgd, replaced("grads", 1, lambda lists: lists["grads"][1].to_sparse()),
            TypeError, r"^grads\[1\] has layout torch.sparse_coo" + SPARSE + "$"),
        Row("sparse csr backup", perturb,
            replaced("backups", 1, lambda lists: lists["backups"][1].to_sparse_csr()), TypeError,
            r"^backups\[1\] has layout torch.sparse_csr" + SPARSE + "$"),
        # 3c. dtype
        Row("integer dtype", perturb,
            each(*(replaced(name, 2, lambda lists, name=name: lists[name][2].long())
                   for name in ("params", "grads", "backups"))),
            TypeError, r"^params\[2\] has dtype torch.int64; " + SUPPORTED + "$"),
        Row("integer dtype, restore_", restore,
            each(*(replaced(name, 1, lambda lists, name=name: lists[name][1].to(torch.int32))
                   for name in ("params", "backups"))),
            TypeError, r"^params\[1\] has dtype torch.int32; " + SUPPORTED + "$"),
        # The op layer takes complex tensors through their real views, so only the contract itself and the kernels
        # see them.
        Row("complex", perturb,
            each(*(replaced(name, 2, lambda lists, name=name: lists[name][2].to(torch.complex64))
                   for name in ("params", "grads", "backups"))),
            TypeError, r"^params\[2\] has dtype torch.complex64; " + SUPPORTED + "$", via_functional=False),
        # 3e. shape and dtype at one index
        Row("shape", perturb, replaced("backups", 2, lambda lists: torch.empty(2, 3, 4, 5, device=dev(lists))),
            ValueError, r"^backups\[2\] has shape \[2, 3, 4, 5\] but params\[2\] has shape \[2, 3, 4, 4\]; tensors at "
                        r"one index must have the same shape$"),
        Row("0-d against 1-d", restore, replaced("backups", 0, lambda lists: torch.zeros((), device=dev(lists))),
            ValueError, r"^backups\[0\] has shape \[\] but params\[0\] has shape \[5\]"),
        Row("dtype", perturb, replaced("grads", 2, lambda lists: lists["grads"][2].double()), ValueError,
            r"^grads\[2\] has dtype torch.float64 but params\[2\] has dtype torch.float32; tensors at one index must "
            r"have the same dtype$"),
        Row("dtype, restore_sgd_ grads", restore_sgd, replaced("grads", 1, lambda lists: lists["grads"][1].half()),
            ValueError, r"^grads\[1\] has dtype torch.float16 but params\[1\] has dtype torch.float32"),
        # 3f. dense, laid out alike
        Row("non-dense params", restore,
            each(replaced("params", 2, lambda lists: _strided_view(SIZES[2], dev(lists))),
                 replaced("backups", 2, lambda lists: _strided_view(SIZES[2], dev(lists)))),
            ValueError, r"^params\[2\] \(shape \[2, 3, 4, 4\], strides \[96, 32, 8, 2\]" + NOT_DENSE + "$"),
        Row("non-dense grad", perturb, replaced("grads", 1, lambda lists: _strided_view(SIZES[1], dev(lists))),
            ValueError, r"^grads\[1\] \(shape \[3, 4\], strides \[8, 2\]" + NOT_DENSE + "$"),
        Row("expanded grad", perturb,
            replaced("grads", 1, lambda lists: torch.zeros(1, 4, device=dev(lists)).expand(3, 4)),
            ValueError, r"^grads\[1\] \(shape \[3, 4\], strides \[0, 1\]" + NOT_DENSE + "$"),
        Row("layout", perturb,
            replaced("grads", 2, lambda lists: lists["grads"][2].contiguous(memory_format=torch.channels_last)),
            ValueError, r"^grads\[2\] \(strides \[48, 1, 12, 3\]\) does not lay out its elements like params\[2\] "
                        r"\(strides \[48, 16, 4, 1\]\); tensors at one index must have the same memory layout$"),
        Row("layout, channels_last params", restore_sgd,
            replaced("params", 2, lambda lists: lists["params"][2].contiguous(memory_format=torch.channels_last)),
            ValueError, r"^backups\[2\] \(strides \[48, 16, 4, 1\]\) does not lay out its elements like params\[2\] "
                        r"\(strides \[48, 1, 12, 3\]\)"),
        # the gradient-reuse ops and norms
        Row("orthogonals length", restore_orthogonal, lambda lists: lists["orthogonals"].pop(), ValueError,
            r"^orthogonals has 2 tensors but params has 3; the lists must have the same length$"),
        Row("orthogonals shape", restore_orthogonal,
            replaced("orthogonals", 1, lambda lists: torch.empty(4, 3, device=dev(lists))), ValueError,
            r"^orthogonals\[1\] has shape \[4, 3\] but params\[1\] has shape \[3, 4\]; tensors at one index must "
            r"have the same shape$"),
        Row("orthogonals dtype, add_orthogonal_", add_orthogonal,
            replaced("orthogonals", 0, lambda lists: lists["orthogonals"][0].half()), ValueError,
            r"^orthogonals\[0\] has dtype torch.float16 but grads\[0\] has dtype torch.float32"),
        Row("integer grads, add_orthogonal_", add_orthogonal,
            each(*(replaced(name, 2, lambda lists, name=name: lists[name][2].long()) for name in ("grads", "orthogonals"))),
            TypeError, r"^grads\[2\] has dtype torch.int64; " + SUPPORTED + "$"),
        Row("integer tensors, norms", norms, replaced("grads", 1, lambda lists: lists["grads"][1].int()), TypeError,
            r"^tensors\[1\] has dtype torch.int32; " + SUPPORTED + "$"),
        Row("sparse tensor, norms", norms, replaced("grads", 0, lambda lists: lists["grads"][0].to_sparse()), TypeError,
            r"^tensors\[0\] has layout torch.sparse_coo" + SPARSE + "$"),
        Row("non-dense tensor, norms", norms, replaced("grads", 1, lambda lists: _strided_view(SIZES[1], dev(lists))),
            ValueError, r"^tensors\[1\] \(shape \[3, 4\], strides \[8, 2\]" + NOT_DENSE + "$"),
        Row("sparse grad, restore_orthogonal_", restore_orthogonal,
            replaced("grads", 2, lambda lists: lists["grads"][2].to_sparse()), TypeError,
            r"^grads\[2\] has layout torch.sparse_coo" + SPARSE + "$"),
        Row("orthogonals layout", restore_orthogonal,
            replaced("orthogonals", 2, lambda lists: lists["orthogonals"][2].contiguous(memory_format=torch.channels_last)),
            ValueError, r"^orthogonals\[2\] \(strides \[48, 1, 12, 3\]\) does not lay out its elements like "
                        r"params\[2\] \(strides \[48, 16, 4, 1\]\)"),
        Row("orthogonals are grads", restore_orthogonal, replaced("orthogonals", 1, lambda lists: lists["grads"][1]),
            ValueError, r"^grads\[1\] and orthogonals\[1\]" + SHARED + "$"),
        Row("orthogonals inside a backup", restore_orthogonal,
            replaced("orthogonals", 0, lambda lists: lists["backups"][2].view(-1)[:5]), ValueError,
            r"^backups\[2\] and orthogonals\[0\]" + SHARED + "$"),
        Row("grads are orthogonals, add_orthogonal_", add_orthogonal,
            replaced("grads", 2, lambda lists: lists["orthogonals"][2]), ValueError,
            r"^grads\[2\] and orthogonals\[2\]" + SHARED + "$"),
        # 4. memory overlap
        Row("backups are params", perturb, replaced("backups", 1, lambda lists: lists["params"][1]), ValueError,
            r"^params\[1\] and backups\[1\]" + SHARED + "$"),
        Row("backups are params, restore_", restore, replaced("backups", 0, lambda lists: lists["params"][0]),
            ValueError, r"^params\[0\] and backups\[0\]" + SHARED + "$"),
        Row("params overlap", perturb, _overlapping_params, ValueError, r"^params\[0\] and params\[1\]" + SHARED + "$"),
        Row("momentum buffer is a grad", restore_sgd, replaced("momentum_buffers", 1, lambda lists: lists["grads"][1]),
            ValueError, r"^grads\[1\] and momentum_buffers\[1\]" + SHARED + "$"),
        Row("backup inside a grad at another index", perturb,
            replaced("backups", 0, lambda lists: lists["grads"][2].view(-1)[3:8]), ValueError,
            r"^grads\[2\] and backups\[0\]" + SHARED + "$"),
        Row("params inside a backup at another index, restore_", restore,
            replaced("params", 1, lambda lists: lists["backups"][2].view(-1)[:12].view(3, 4)), ValueError,
            r"^params\[1\] and backups\[2\]" + SHARED + "$"),
        # the sweep keeps the range reaching furthest, not the latest one: grads[1] (read) ends inside grads[2]
        # before backups[0] starts
        Row("behind a shorter range", perturb,
            each(replaced("grads", 1, lambda lists: lists["grads"][2].view(-1)[4:16].view(3, 4)),
                 replaced("backups", 0, lambda lists: lists["grads"][2].view(-1)[40:45])),
            ValueError, r"^grads\[2\] and backups\[0\]" + SHARED + "$"),
        # the pair is named in (list, index) order, not in address order
        Row("params after a backup's start", restore,
            replaced("params", 0, lambda lists: lists["backups"][1].view(-1)[2:7]), ValueError,
            r"^params\[0\] and backups\[1\]" + SHARED + "$"),
        # the order: every per-index check of index i comes before index i + 1, overlap last
        Row("index order", perturb,
            each(replaced("grads", 2, lambda lists: lists["grads"][2].double()),
                 replaced("backups", 1, lambda lists: lists["params"][1]),
                 replaced("backups", 0, lambda lists: torch.empty(6, device=dev(lists)))),
            ValueError, r"^backups\[0\] has shape \[6\] but params\[0\] has shape \[5\]"),
        Row("per-index checks before overlap", perturb,
            each(replaced("backups", 0, lambda lists: lists["params"][0]),
                 replaced("grads", 2, lambda lists: lists["grads"][2].double())),
            ValueError, r"^grads\[2\] has dtype torch.float64"),
    ]
    rows[3:3] = _scalar_rows()
    if device == "cuda":
        rows += [
            Row("device of a grad", perturb, replaced("grads", 2, lambda lists: lists["grads"][2].cpu()), ValueError,
                r"^grads\[2\] is on cpu but params\[0\] is on cuda:0; all tensors must be on one device$"),
            Row("device of a param", restore,
                each(replaced("params", 1, lambda lists: lists["params"][1].cpu()),
                     replaced("backups", 1, lambda lists: lists["backups"][1].cpu())),
                ValueError, r"^params\[1\] is on cpu but params\[0\] is on cuda:0; all tensors must be on one device$"),
        ]
    return [row for row in rows if device in row.devices]


def _overlapping_params(lists):
    buffer = torch.randn(40, device=lists["params"][0].device)
    lists["params"][0] = buffer[:5]
    lists["params"][1] = buffer[3:15].view(3, 4)


ROWS = _bad_inputs("cpu")
CUDA_ROWS = _bad_inputs("cuda")


# -- running a row ---------------------------------------------------------------------------------------------------
def _bits(t):
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.cpu().contiguous().reshape(-1).view(torch.uint8).clone()


def _snapshot(lists):
    # Every list: what the ops write (params, backups, where reference keeps Δ, momentum buffers, orthogonals, and
    # the grads add_orthogonal_ writes) and what they only read.
    return {name: [_bits(t) if isinstance(t, torch.Tensor) and t.layout == torch.strided else None for t in tensors]
            for name, tensors in lists.items()}


def _assert_unchanged(lists, before, what):
    for name, saved in before.items():
        for i, (t, bits) in enumerate(zip(lists[name], saved)):
            if bits is not None:
                assert torch.equal(_bits(t), bits), f"{what} wrote {name}[{i}] before raising"


def _first_line(exc):
    # TORCH_CHECK messages carry C++ context on later lines when TORCH_SHOW_CPP_STACKTRACES=1 ("Exception raised
    # from ...", a C++ traceback); the contract's messages are one line.
    return str(exc).split("\n", 1)[0]


def _raises(row, op, fn, what):
    with pytest.raises(Exception) as info:
        fn()
    exc = info.value
    assert type(exc) is row.error, f"{what}: expected {row.error.__name__}, got {type(exc).__name__}: {exc}"
    message = _first_line(exc)
    prefix = f"amp_fused.{op}: "
    assert message.startswith(prefix), f"{what}: {message!r} does not start with {prefix!r}"
    assert re.search(row.message, message[len(prefix):]), f"{what}: {message!r} does not match {row.message!r}"
    return exc


def check_row(row, backend, device="cpu"):
    lists = make_lists(device)
    row.breakage(lists)
    op, args = row.call(lists)
    before = _snapshot(lists)

    expected = _raises(row, op, lambda: python_contract(op, args), "the Python contract")
    _assert_unchanged(lists, before, "the Python contract")

    if row.via_functional:
        _raises(row, op, lambda: getattr(functional, op)(*args, backend=backend, validate=True),
                f"functional.{op} on {backend}")
        _assert_unchanged(lists, before, f"functional.{op} on {backend}")

    if backend in NATIVE and row.native and op != "perturbation":
        got = _raises(row, op, lambda: getattr(torch.ops.amp_fused, op)(*args), f"torch.ops.amp_fused.{op}")
        assert type(got) is type(expected)
        assert _first_line(got) == _first_line(expected), "the C++ contract and the Python one disagree"
        if device == "cuda":
            torch.cuda.synchronize()
        _assert_unchanged(lists, before, f"torch.ops.amp_fused.{op}")


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("row", ROWS, ids=str)
def test_bad_input_raises_the_contract_error_and_writes_nothing(row, backend):
    check_row(row, backend)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", available_backends("cuda") if torch.cuda.is_available() else ["cuda"])
@pytest.mark.parametrize("row", CUDA_ROWS, ids=str)
def test_bad_input_raises_the_contract_error_and_writes_nothing_cuda(row, backend):
    check_row(row, backend, device="cuda")


def test_the_table_covers_every_check():
    names = {row.name for row in ROWS}
    cuda_only = {row.name for row in CUDA_ROWS} - names
    assert {"device of a grad", "device of a param"} <= cuda_only
    assert all(any(row.message.startswith(rf"^{s}") for row in ROWS)
               for s in ("epsilon", "inner_lr", "lr", "momentum", "dampening", "weight_decay", "alpha"))
    ops = {row.call(make_lists())[0] for row in ROWS}
    assert ops >= {"perturb_", "restore_", "restore_sgd_", "norms", "restore_orthogonal_", "add_orthogonal_"}


# -- what the contract accepts ---------------------------------------------------------------------------------------
def _valid_cases(device="cpu"):
    def views_of_one_buffer(lists):  # adjacent views, no element shared
        buffer = torch.randn(5 + 12 + 96, device=device)
        lists["params"][0] = buffer[:5]
        lists["params"][1] = buffer[5:17].view(3, 4)
        lists["params"][2] = buffer[17:].view(2, 3, 4, 4)

    def overlapping_reads(lists):  # two read-only tensors may share memory
        lists["grads"][0] = lists["grads"][1].view(-1)[:5]

    def channels_last_everywhere(lists):
        for name in lists:
            lists[name][2] = lists[name][2].contiguous(memory_format=torch.channels_last)

    def size_one_dims(lists):  # strides of size-1 dims never move an element, so they may differ
        for name in lists:
            lists[name][1] = torch.randn(3, 1, 4, device=device)
        lists["grads"][1] = torch.randn(3, 4, 1, device=device).transpose(1, 2)

    def empty_tensors(lists):  # no elements: no layout and no memory to check
        for name in lists:
            lists[name][0] = torch.empty(0, 5, device=device)
        lists["backups"][0] = torch.empty(5, 0, device=device).t()

    def no_momentum(lists):  # restore_sgd_ with momentum 0 ignores momentum_buffers
        lists["momentum_buffers"] = []

    return [
        ("views of one buffer", perturb, views_of_one_buffer),
        ("overlapping reads", perturb, overlapping_reads),
        ("channels_last everywhere", restore_sgd, channels_last_everywhere),
        ("size-1 dims", perturb, size_one_dims),
        ("empty tensors", perturb, empty_tensors),
        ("momentum 0 ignores the buffers", lambda lists: restore_sgd(lists, momentum=0.0), no_momentum),
        ("negative dampening", lambda lists: restore_sgd(lists, dampening=-0.5), lambda lists: None),
        ("perturbation reads only", perturbation,
         replaced("backups", 1, lambda lists: lists["params"][1])),
        ("empty lists", lambda lists: perturb({name: [] for name in lists}), lambda lists: None),
        ("eta=0.01", lambda lists: perturb(lists, eta=0.01), lambda lists: None),
        ("eta=0", lambda lists: perturb(lists, eta=0.0), lambda lists: None),
        ("norms reads only", lambda lists: ("norms", (lists["grads"][:2] + [lists["grads"][0]],)), lambda lists: None),
        ("restore_orthogonal_", restore_orthogonal, lambda lists: None),
        ("restore_orthogonal_ channels_last", restore_orthogonal, channels_last_everywhere),
        ("add_orthogonal_", add_orthogonal, lambda lists: None),
        ("add_orthogonal_ with alpha 0", lambda lists: add_orthogonal(lists, alpha=0.0), lambda lists: None),
        ("add_orthogonal_ reads orthogonals twice", add_orthogonal,
         replaced("orthogonals", 0, lambda lists: lists["orthogonals"][1].view(-1)[:5])),
    ]


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("case", _valid_cases(), ids=lambda case: case[0])
def test_valid_input_passes(case, backend):
    _, call, breakage = case
    lists = make_lists()
    breakage(lists)
    op, args = call(lists)
    python_contract(op, args)
    getattr(functional, op)(*args, backend=backend, validate=True)
    if backend in NATIVE and op != "perturbation" and len(args[0]):
        getattr(torch.ops.amp_fused, op)(*args)


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_complex_tensors_are_valid_through_the_op_layer(backend):
    lists = {name: [t.to(torch.complex64) if i == 1 else t for i, t in enumerate(tensors)]
             for name, tensors in make_lists().items()}
    theta = [p.clone() for p in lists["params"]]
    functional.perturb_(lists["params"], lists["grads"], lists["backups"], 0.5, 1.0, backend=backend)
    assert not torch.equal(lists["params"][1], theta[1])  # written through the real view
    functional.restore_(lists["params"], lists["backups"], backend=backend)
    torch.testing.assert_close(lists["params"][1], theta[1])


# -- the overlap sweep -----------------------------------------------------------------------------------------------
def test_overlap_reports_the_same_pair_as_the_kernels_among_many_tensors():
    """1,000 tensors carved from one buffer, plus one written tensor straddling two of them: the sweep finds the
    first pair in (list, index) order, in Python and in C++."""
    n = 1000
    buffer = torch.randn(2 * n * 4)
    params = list(buffer[: n * 4].view(n, 4).unbind())
    grads = list(buffer[n * 4:].view(n, 4).unbind())
    backups = [torch.empty(4) for _ in range(n)]
    # backups[700] covers the last two elements of grads[10] and the first two of grads[11]
    backups[700] = buffer[n * 4 + 10 * 4 + 2: n * 4 + 10 * 4 + 6]
    message = r"^amp_fused.perturb_: grads\[10\] and backups\[700\]" + SHARED + "$"
    with pytest.raises(ValueError, match=message):
        checks.check_perturb(params, grads, backups, 0.5, 1.0)
    if "cpu" in available_backends("cpu"):
        with pytest.raises(ValueError, match=message):
            torch.ops.amp_fused.perturb_(params, grads, backups, 0.5, 1.0, True, True)


def test_overlap_check_is_fast_enough_for_a_thousand_tensors():
    import time

    n = 1000
    params = [torch.randn(16) for _ in range(n)]
    grads = [torch.randn(16) for _ in range(n)]
    backups = [torch.empty(16) for _ in range(n)]
    checks.check_perturb(params, grads, backups, 0.5, 1.0)
    start = time.perf_counter()
    for _ in range(5):
        checks.check_perturb(params, grads, backups, 0.5, 1.0)
    per_call = (time.perf_counter() - start) / 5
    assert per_call < 0.1, f"{per_call * 1e3:.1f} ms per call for {n} tensors"


def test_check_lists_is_the_general_form():
    lists = make_lists()
    checks.check_lists("my_op", [("a", lists["params"], True), ("b", lists["grads"], False)])
    with pytest.raises(ValueError, match=r"^amp_fused.my_op: b has 2 tensors but a has 3"):
        checks.check_lists("my_op", [("a", lists["params"], True), ("b", lists["grads"][:2], False)])
    with pytest.raises(ValueError, match=r"^amp_fused.my_op: a\[(\d)\] and b\[\1\]" + SHARED):
        checks.check_lists("my_op", [("a", lists["params"], True), ("b", lists["params"], False)])
    # overlap=False (FakeTensor / meta tracing) leaves the memory out
    checks.check_lists("my_op", [("a", lists["params"], True), ("b", lists["params"], False)], overlap=False)


# -- the fake implementations (torch.compile / FakeTensor tracing) ---------------------------------------------------
@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="the torch ops need amp_fused._C")
@pytest.mark.parametrize("row", [row for row in ROWS if row.native and SHARED not in row.message
                                 and "layout torch.sparse" not in row.message], ids=str)
def test_fake_implementations_raise_the_contract_error(row):
    """A traced call fails where an eager one would: the same error from FakeTensors (memory overlap aside, as fake
    tensors have no memory)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    lists = make_lists()
    row.breakage(lists)
    op, args = row.call(lists)
    if op == "perturbation":
        pytest.skip("perturbation is not a torch op")
    expected = _raises(row, op, lambda: python_contract(op, args), "the Python contract")
    with FakeTensorMode() as mode:
        fake = tuple([mode.from_tensor(t) for t in a] if isinstance(a, list) else a for a in args)
        got = _raises(row, op, lambda: getattr(torch.ops.amp_fused, op)(*fake), "the fake implementation")
    assert _first_line(got) == _first_line(expected)
