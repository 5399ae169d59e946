"""The README's transformers.Trainer recipe (``training_step`` overridden) with the real package, against a plain
``opt.step(closure)`` loop from the same weights and batches (float64, CPU, 3 steps).

The Trainer clips and then calls ``optimizer.step()`` itself; the recipe's ``training_step`` runs the pass at θ,
``first_step()``, and the pass at θ + Δ, so the Trainer's clip acts on the final gradient only and its
``optimizer.step()`` (AMP.step() without a closure after first_step()) is the second step.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from amp_fused import AMP  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, BATCH = 3, 16
HP = dict(lr=0.5, epsilon=0.05, inner_lr=1.0, momentum=0.9)
CLIP = 0.05


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()

    def forward(self, x, labels):
        return {"loss": nn.functional.cross_entropy(self.net(x), labels)}


def data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(STEPS * BATCH, 8, generator=gen, dtype=torch.float64), \
        torch.randint(0, 4, (STEPS * BATCH,), generator=gen)


class Rows(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = data()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class AMPTrainer(transformers.Trainer):
    """The recipe (README, 'transformers.Trainer')."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)  # forward + backward at θ
        self.optimizer.optimizer.first_step(zero_grad=True)  # the AcceleratedOptimizer's AMP: θ → θ + Δ
        super().training_step(model, inputs, num_items_in_batch)  # backward at θ + Δ
        return loss  # logged: the loss at θ; the Trainer then clips and calls optimizer.step() = second_step

    def _get_train_sampler(self, *args, **kwargs):  # the plain loop's order (the test's choice, not the recipe's)
        return torch.utils.data.SequentialSampler(self.train_dataset)


def plain(clip):
    model = Net()
    opt = AMP(model.parameters(), **HP)
    x, y = data()
    losses = []
    for s in range(STEPS):
        xb, yb = x[s * BATCH:(s + 1) * BATCH], y[s * BATCH:(s + 1) * BATCH]
        loss = model(xb, yb)["loss"]
        loss.backward()
        losses.append(loss.item())
        opt.first_step(zero_grad=True)
        model(xb, yb)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)  # the final gradient only
        opt.second_step(zero_grad=True)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), losses


def arguments(tmp_path):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=STEPS, use_cpu=True,
        lr_scheduler_type="constant", max_grad_norm=CLIP, logging_steps=1, report_to="none", save_strategy="no",
        remove_unused_columns=False, disable_tqdm=True)


def train(trainer_class, model, tmp_path):
    try:
        trainer = trainer_class(model=model, args=arguments(tmp_path), train_dataset=Rows(),
                                optimizers=(AMP(model.parameters(), **HP), None))
        trainer.train()
    finally:  # Accelerate's state is process-wide
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return trainer


def test_stock_trainer_cannot_step_amp(tmp_path):
    # before: the Trainer calls optimizer.step() without a closure and without a pending first_step()
    with pytest.raises(ValueError, match="AMP.step needs a closure"):
        train(transformers.Trainer, Net(), tmp_path)


def test_trainer_recipe_equals_the_plain_loop(tmp_path):
    model = Net()
    trainer = train(AMPTrainer, model, tmp_path)
    expected, losses = plain(CLIP)
    got = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert trainer.state.global_step == STEPS
    assert (got - expected).abs().max().item() <= 1e-12
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx(losses, abs=1e-4)  # the Trainer rounds what it logs to 4 digits
    unclipped, _ = plain(float("inf"))
    assert (unclipped - expected).abs().max().item() > 1e-6  # the clip acts
