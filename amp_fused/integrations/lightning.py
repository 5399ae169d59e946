"""PyTorch Lightning (2.x) precision plugins that run :class:`amp_fused.AMP` the way it needs to run.

``Trainer(plugins=[amp_precision("16-mixed")])`` in place of ``precision=...`` ("32-true": :class:`AMPPrecision`;
"bf16-mixed", "16-mixed" with a GradScaler: :class:`AMPMixedPrecision`). With an AMP optimizer, automatic
optimization then:

- calls ``optimizer.step(closure, scaler=...)`` (Lightning's own ``MixedPrecision`` calls the closure itself and
  ``scaler.step(optimizer)`` without one, which AMP cannot take), then ``scaler.update()``;
- runs ``on_before_optimizer_step`` and gradient clipping once per step, on the final gradient (the one at
  θ + Δ that the base optimizer steps with), unscaled first under ``16-mixed``; the ascent gradients are neither
  clipped nor shown to that hook;
- hands Lightning the pass at θ as the step's output (``outputs`` in ``on_train_batch_end``), the loss that
  ``AMP.step`` returns;
- refuses ``accumulate_grad_batches > 1``: AMP needs both passes over every micro-batch inside one step, and
  Lightning would run the earlier micro-batches outside it (use manual optimization, see the README).

In manual optimization, ``self.optimizers().step()`` after ``first_step()`` completes the two-call API
(``second_step``, through the scaler under ``16-mixed``) and counts as an optimizer step (``global_step``,
``max_steps``). ``training_step`` runs once per pass (1 + ``inner_iter`` times per AMP step); log from the pass
at θ with ``if not self.optimizers().is_perturbed: self.log(...)``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.core.optimizer import do_nothing_closure
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision
except ImportError:  # the standalone distribution
    import pytorch_lightning as pl
    from pytorch_lightning.core.optimizer import do_nothing_closure
    from pytorch_lightning.plugins.precision import MixedPrecision, Precision

from ..optimizer import AMP

__all__ = ["AMPPrecision", "AMPMixedPrecision", "amp_precision", "closure_calls"]

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


def closure_calls(optimizer: AMP) -> int:
    """How many times the next ``optimizer.step(closure)`` calls the closure (the last call is the pass whose
    gradient the base optimizer steps with)."""
    return 1 + optimizer.inner_iter if optimizer.next_step_kind() == "amp" else 1


def _amp_of(optimizer) -> AMP | None:
    optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer's wrapped optimizer
    return optimizer if isinstance(optimizer, AMP) else None


def _check_accumulation(trainer) -> None:
    if trainer is not None and trainer.accumulate_grad_batches > 1:
        raise ValueError(
            f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) with an amp_fused.AMP optimizer "
            "under automatic optimization: accumulate_grad_batches must be 1. AMP needs both passes (at θ and at "
            "θ + Δ) over every micro-batch inside one optimizer step, but Lightning runs the earlier micro-batches "
            "outside it, so their gradients would be dropped. Use manual optimization (automatic_optimization = "
            "False) and accumulate inside one training_step: backward every micro-batch, opt.first_step(), "
            "backward every micro-batch again, opt.step() (see the README, 'PyTorch Lightning').")


class _AMPStep:
    """The optimizer step of both plugins; ``self.scaler`` is a GradScaler or None."""

    scaler = None

    def connect(self, model, optimizers, lr_schedulers):
        module = getattr(model, "module", model)  # DDP wraps the LightningModule by now
        if (isinstance(module, pl.LightningModule) and module.automatic_optimization
                and any(_amp_of(o) is not None for o in optimizers)):
            _check_accumulation(module._trainer)
        return super().connect(model, optimizers, lr_schedulers)

    def optimizer_step(self, optimizer, model, closure: Callable[[], Any], **kwargs: Any) -> Any:
        amp = _amp_of(optimizer)
        if amp is None:
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        if kwargs:
            raise TypeError(f"AMP's step takes no keyword arguments from Lightning, got {sorted(kwargs)}")
        scaler = self.scaler
        if not model.automatic_optimization and amp.is_perturbed:
            # opt.step() after first_step(): the second call of the two-call API, counted by Lightning
            closure()  # manual optimization's closure: the user's, or Lightning's do-nothing one
            self._final_gradient(model, amp)
            result = amp.second_step(scaler=scaler)
        else:
            if model.automatic_optimization:
                _check_accumulation(model.trainer)
            elif closure is do_nothing_closure:
                raise ValueError("optimizer.step() without a closure under an amp_fused.AMP optimizer needs a pending "
                                 "first_step(): pass the closure (opt.step(closure)), or call opt.first_step() "
                                 "after the backward at θ and opt.step() after the backward at θ + Δ")
            result = amp.step(self._step_closure(model, amp, closure), scaler=scaler)
        if scaler is not None:
            scaler.update()
        return result

    def _step_closure(self, model, amp: AMP, closure):
        calls, done, first = closure_calls(amp), [0], {}

        def wrapped():
            result = closure()
            done[0] += 1
            if done[0] == 1 and hasattr(closure, "_result"):
                first["result"] = closure._result  # Lightning reports the last call's output; we want θ's
            if done[0] == calls:
                self._final_gradient(model, amp)
                if "result" in first:
                    closure._result = first["result"]
            if result is None and model.automatic_optimization:  # (manual: AMP's own check names the closure)
                raise TypeError("training_step returned None under an amp_fused.AMP optimizer: AMP cannot skip one "
                                "of its passes; return the loss (skipping batches is not supported)")
            return result

        return wrapped

    def _final_gradient(self, model, amp: AMP) -> None:
        """Hooks and clipping see the final, unscaled gradient, once per step."""
        if self.scaler is not None:
            amp.unscale_(self.scaler)
        self._after_closure(model, amp)


class AMPPrecision(_AMPStep, Precision):
    """fp32 training (``precision="32-true"``) with an AMP optimizer; other optimizers step as usual."""


class AMPMixedPrecision(_AMPStep, MixedPrecision):
    """``"16-mixed"`` (autocast to fp16 and a GradScaler) or ``"bf16-mixed"`` with an AMP optimizer."""

    def __init__(self, precision: str = "16-mixed", device: str | None = None, scaler=None) -> None:
        if precision not in ("16-mixed", "bf16-mixed"):
            raise ValueError(f"precision must be '16-mixed' or 'bf16-mixed', got {precision!r}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        super().__init__(precision, device, scaler)


def amp_precision(precision: str = "32-true", device: str | None = None, scaler=None):
    """The plugin for ``precision``: one of ``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``."""
    if precision == "32-true":
        if scaler is not None:
            raise ValueError("scaler is only for precision='16-mixed'")
        return AMPPrecision()
    if precision in PRECISIONS:
        return AMPMixedPrecision(precision, device, scaler)
    raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
