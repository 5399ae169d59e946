"""Training-loop helpers of the optimizer: what a closure returned, BatchNorm statistics frozen at θ + Δ,
DDP's all-reduce skipped for ascent passes, GradScaler bookkeeping, and the torch.compile guard."""
from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils._pytree import tree_map


def check_closure(closure) -> None:
    if closure is None:
        raise ValueError("AMP.step needs a closure (it runs forward and backward twice); without one, "
                         "call first_step() after your backward pass, then second_step() (or step()) after the "
                         "next one")
    if not callable(closure):
        raise TypeError(f"closure must be callable, got {type(closure).__name__}")


def detached(result):
    """Validate what a closure returned and detach it: a loss tensor or an (outputs, loss) pair."""
    if isinstance(result, torch.Tensor):
        return result.detach()
    if isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[1], torch.Tensor):
        outputs, loss = result
        return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, outputs), loss.detach()
    raise TypeError("closure must return the loss tensor or an (outputs, loss) pair with a loss tensor, "
                    f"got {type(result).__name__}")


def eager_under_compile(fn):
    """Run ``fn`` eagerly under torch.compile.

    Dynamo (torch 2.14) silently drops attribute assignments on the torch.optim.Optimizer objects it traces, and
    a step must not lose its progress (ascent count, plan): a traced step could skip the restore. So the
    stepping methods run eagerly; compile the model instead (a compiled model still runs compiled inside them),
    the ops themselves are fused already. ``torch.compiler.disable`` is applied at the first call, as
    torch.optim does, so that importing amp_fused does not import Dynamo.
    """
    disabled = None
    reason = "AMP keeps its per-step state in optimizer attributes (an AmpState), whose updates Dynamo may drop"

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            if torch.compiler.is_compiling():
                # The first call is being traced: Dynamo cannot apply disable() in a compiled region (torch 2.14
                # says so naming the reason, torch 2.13 only that disable is skipped). Break the graph here with
                # the reason, so that disable() runs eagerly (fullgraph=True: an error that says why).
                torch._dynamo.graph_break(msg=reason)
            disabled = torch.compiler.disable(fn, reason=reason)
        return disabled(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def frozen_bn_statistics(model):
    """BatchNorm layers run with momentum 0 (running statistics unchanged) and their batch counters kept."""
    saved = []
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats:
            saved.append((module, module.momentum, module.num_batches_tracked.clone()))
            module.momentum = 0.0
    try:
        yield
    finally:
        for module, momentum, count in saved:
            module.momentum = momentum
            module.num_batches_tracked.copy_(count)


def forward_backward(closure, state, perturbed: bool, ascent: bool):
    """One closure call, with BN statistics frozen at θ + Δ and DDP's all-reduce skipped for ascents when the
    options ask for it."""
    with contextlib.ExitStack() as stack:
        if perturbed and state.bn_stats == "unperturbed":
            stack.enter_context(frozen_bn_statistics(state.model))
        if ascent and not state.sync_ascent:
            stack.enter_context(state.model.no_sync())
        return closure()


def inverse_scale(scaler) -> float:
    """1/scale of a GradScaler (one host sync), 1 without one: the ascent then uses ζ/scale on the scaled
    gradient instead of unscaling it in place."""
    return 1.0 / scaler.get_scale() if scaler is not None else 1.0


def report_ascent_overflow(step_norms, param_groups) -> None:
    """Make a GradScaler see an overflow of the ascent passes: their gradients are gone, but the step must be
    skipped all the same. Adding +Inf (or exactly 0) to one gradient element does it without a host sync."""
    if not step_norms:
        return
    norms = torch.cat([n.to(step_norms[0].device) for n in step_norms])
    for group in param_groups:
        for p in group["params"]:
            if p.grad is not None and p.grad.numel():
                flag = torch.logical_not(torch.isfinite(norms).all()).to(p.grad.device)
                p.grad.view(-1)[:1].add_(torch.where(flag, float("inf"), 0.0).to(p.grad.dtype))
                return
