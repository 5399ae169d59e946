"""amp_fused.AMP under Hugging Face Accelerate (the real package, one CPU process): ``accelerator.prepare(model,
opt, loader)`` with ``opt.step(closure)``, the two-call API under ``accelerator.accumulate``, and
``mixed_precision="bf16"``, each against a plain loop from the same weights and batches.

float64 models (rounding is ~1e-16; the tolerance is 1e-12), float32 under bf16 autocast (the plain loop runs the
same ops: the tolerance is 0, bit-identical).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

accelerate = pytest.importorskip("accelerate")
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from amp_fused import AMP  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, BATCH = 3, 16
HP = dict(lr=0.5, epsilon=0.05, inner_lr=1.0, momentum=0.9)
EXACT = 1e-12
FAR = 1e-6


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    # AcceleratorState is a process-wide singleton: each test builds its own Accelerator
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def mlp(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def dataset(dtype, n=STEPS * BATCH):
    gen = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(torch.randn(n, 8, generator=gen).to(dtype),
                                          torch.randint(0, 4, (n,), generator=gen))


def loss_of(out, y):
    return nn.functional.cross_entropy(out.float() if out.dtype in (torch.float16, torch.bfloat16) else out, y)


def params(model):
    return torch.cat([p.detach().flatten().double() for p in model.parameters()])


def maxdiff(a, b):
    return (a - b).abs().max().item()


def plain(dtype, bf16=False, micro=1, n=STEPS * BATCH):
    """The plain loop: opt.step(closure) per batch of BATCH; ``micro`` > 1 splits each batch into that many
    micro-batches accumulated at θ and at θ + Δ (the exact large-batch AMP step)."""
    net = mlp(dtype)
    opt = AMP(net.parameters(), **HP)
    data, losses = dataset(dtype, n), []
    for s in range(n // BATCH):
        x, y = data[s * BATCH:(s + 1) * BATCH]

        def closure():
            total = 0.0
            for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = net(xm)
                loss = loss_of(out, ym) / micro
                loss.backward()
                total = total + loss.detach()
            return total

        losses.append(opt.step(closure))
    return params(net), torch.stack(losses)


def prepared(dtype, batch=BATCH, **accelerator_kwargs):
    accelerator = accelerate.Accelerator(cpu=True, **accelerator_kwargs)
    net = mlp(dtype)
    loader = torch.utils.data.DataLoader(dataset(dtype), batch_size=batch)
    net, opt, loader = accelerator.prepare(net, AMP(net.parameters(), **HP), loader)
    return accelerator, net, opt, loader


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_prepare_and_step_with_a_closure(mixed_precision):
    dtype = torch.float64 if mixed_precision == "no" else torch.float32
    accelerator, net, opt, loader = prepared(dtype, mixed_precision=mixed_precision)
    theta = []
    for x, y in loader:
        calls = []

        def closure():
            loss = loss_of(net(x), y)  # for bf16, prepare() wrapped the forward in autocast
            accelerator.backward(loss)
            calls.append(loss.detach())
            return loss

        assert opt.step(closure) is None  # AcceleratedOptimizer.step drops what AMP.step returns ...
        theta.append(calls[0])  # ... so keep the loss at θ from the first call
        assert len(calls) == 2
    expected, expected_losses = plain(dtype, bf16=mixed_precision == "bf16")
    tol = EXACT if dtype == torch.float64 else 0.0
    assert maxdiff(params(net), expected) <= tol
    assert maxdiff(torch.stack(theta), expected_losses) <= tol


def test_bf16_really_autocasts():
    # the bf16 comparison above means something: bf16 training differs from fp32 training by far more than 0
    assert maxdiff(plain(torch.float32, bf16=True)[0], plain(torch.float32)[0]) > FAR


@pytest.mark.parametrize("micro", [1, 2])
@pytest.mark.parametrize("second", ["step", "second_step"])
def test_two_call_api_under_accumulate_equals_the_large_batch_step(micro, second):
    """The recipe: per optimizer step, both sweeps over its micro-batches, each micro-batch inside
    accelerator.accumulate (which divides the loss by the accumulation steps and syncs on the last one); the
    second call either opt.step() (AMP.step() without a closure after first_step() is second_step(), and
    Accelerate runs it when the last micro-batch synced) or second_step() on the AMP optimizer."""
    accelerator, net, opt, loader = prepared(torch.float64, batch=BATCH // micro, gradient_accumulation_steps=micro)
    amp = opt.optimizer  # AcceleratedOptimizer does not forward first_step / second_step
    batches = list(loader)
    for s in range(STEPS):
        group = batches[s * micro:(s + 1) * micro]
        for x, y in group:  # at θ
            with accelerator.accumulate(net):
                accelerator.backward(loss_of(net(x), y))
        amp.first_step(zero_grad=True)
        for x, y in group:  # at θ + Δ
            with accelerator.accumulate(net):
                accelerator.backward(loss_of(net(x), y))
        if second == "step":
            opt.step()
            opt.zero_grad()
        else:
            amp.second_step(zero_grad=True)
        assert not amp.is_perturbed
    expected, _ = plain(torch.float64, micro=micro)
    assert maxdiff(params(net), expected) <= EXACT


def test_closure_step_inside_accumulate_drops_micro_batches():
    """Before: the obvious loop (opt.step(closure) per micro-batch inside accelerator.accumulate) is silently
    wrong: Accelerate skips the step, closure and all, on every micro-batch but the last, so the step is an AMP
    step on the last micro-batch with loss / 2. This is why the recipe above uses the two-call API."""
    accelerator, net, opt, loader = prepared(torch.float64, batch=BATCH // 2, gradient_accumulation_steps=2)
    for x, y in loader:
        with accelerator.accumulate(net):
            def closure():
                loss = loss_of(net(x), y)
                accelerator.backward(loss)
                return loss

            opt.step(closure)
    expected, _ = plain(torch.float64, micro=2)
    assert maxdiff(params(net), expected) > FAR
