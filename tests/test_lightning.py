"""amp_fused.AMP under PyTorch Lightning 2.x (the real package): each finding of issue 14, before (Lightning's
stock precision plugins) and after (amp_fused.integrations.lightning), compared with a plain loop over the same
weights and batches.

Small MLPs, 3 steps of 16 samples, CPU. float64 where no autocast is involved (differences of order 1e-16 are
rounding, 1e-6 and up are not); float32 under bf16/fp16 autocast, where the plain loop runs the same ops in the
same order and must match exactly. On CPU, Lightning turns ``precision="16-mixed"`` into bf16; the fp16 path is
tested through the plugin with ``device="cpu"``: fp16 autocast on CPU and a real ``torch.amp.GradScaler("cpu")``.
"""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.loggers import Logger  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

from amp_fused import AMP  # noqa: E402
from amp_fused.integrations.lightning import AMPMixedPrecision, AMPPrecision, amp_precision  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, BATCH = 3, 16
HP = dict(lr=0.5, epsilon=0.05, inner_lr=1.0, momentum=0.9)
CLIP = 0.05  # below every gradient norm here, so that clipping acts in every pass
EXACT = 1e-12  # float64: rounding only
FAR = 1e-6  # a difference that is not rounding
SCHED_WARNING = "lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)"


def mlp(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def dataset(dtype, steps=STEPS, batch=BATCH):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(steps * batch, 8, generator=gen).to(dtype)
    return torch.utils.data.TensorDataset(x, torch.randint(0, 4, (steps * batch,), generator=gen))


def batches(dtype, steps=STEPS, batch=BATCH):
    data = dataset(dtype, steps, batch)
    return [data[i * batch:(i + 1) * batch] for i in range(steps)]


def loss_of(net, x, y):
    out = net(x)
    return nn.functional.cross_entropy(out.float() if out.dtype in (torch.float16, torch.bfloat16) else out, y)


def params(module):
    return torch.cat([p.detach().flatten().double() for p in module.parameters()])


def maxdiff(a, b):
    return (a - b).abs().max().item()


def autocast(precision):
    if precision == "32-true":
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cpu", dtype=torch.bfloat16 if precision == "bf16-mixed" else torch.float16,
                          cache_enabled=False)


def plain(dtype=torch.float64, precision="32-true", clip=None, data=None, sched=False):
    """The plain loop: ``opt.step(closure, scaler=...)`` (the README's recipe), or with ``clip`` the two-call API
    clipping the final (unscaled) gradient only. Returns the parameters, the losses at θ and the last lr."""
    net = mlp(dtype)
    opt = AMP(net.parameters(), **HP)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) if sched else None
    scaler = torch.amp.GradScaler("cpu") if precision == "16-mixed" else None
    losses = []
    for x, y in data or batches(dtype):
        def closure():
            with autocast(precision):
                loss = loss_of(net, x, y)
            (scaler.scale(loss) if scaler else loss).backward()
            return loss

        if clip is None:
            losses.append(opt.step(closure, scaler=scaler))
        else:
            losses.append(closure().detach())
            opt.first_step(zero_grad=True, scaler=scaler)
            closure()
            if scaler:
                opt.unscale_(scaler)
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.second_step(zero_grad=True, scaler=scaler)
        if scaler:
            scaler.update()
        if scheduler:
            scheduler.step()
    return params(net), torch.stack(losses).double(), opt.param_groups[0]["lr"]


class Recorder(Logger):
    """What a logger receives: every ``log_metrics`` call."""

    def __init__(self):
        super().__init__()
        self.metrics = []

    name, version = "recorder", 0

    @property
    def experiment(self):
        return None

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))


class Net(pl.LightningModule):
    """Automatic optimization; logs the loss at θ the documented way (``log_theta``) or on every pass."""

    def __init__(self, dtype=torch.float64, log_theta=True, sched=False):
        super().__init__()
        self.net, self.log_theta, self.sched = mlp(dtype), log_theta, sched
        self.outputs = []

    def training_step(self, batch, batch_idx):
        loss = loss_of(self.net, *batch)
        if not (self.log_theta and self.optimizers().is_perturbed):
            self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.outputs.append(outputs["loss"].double())

    def configure_optimizers(self):
        opt = AMP(self.parameters(), **HP)
        if not self.sched:
            return opt
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


def fit(module, data=None, logger=None, batch_size=BATCH, ckpt_path=None, **trainer_kwargs):
    trainer_kwargs.setdefault("max_epochs", 1)
    trainer = pl.Trainer(logger=logger or False, log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                         **trainer_kwargs)
    loader = torch.utils.data.DataLoader(data or dataset(module.net[0].weight.dtype), batch_size=batch_size)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def test_import_amp_fused_never_imports_lightning():
    code = ("import sys, amp_fused, amp_fused.integrations; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'accelerate')"
            " or m.startswith('amp_fused.integrations.')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plugin_factory_rejects_unknown_precision():
    assert isinstance(amp_precision(), AMPPrecision)
    assert isinstance(amp_precision("bf16-mixed", "cpu"), AMPMixedPrecision)
    with pytest.raises(ValueError, match="precision must be one of '32-true', 'bf16-mixed', '16-mixed', got '64-true'"):
        amp_precision("64-true")


# -- 1. automatic optimization: steps, precision, clipping ------------------------------------------------------
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_plugin_equals_the_plain_loop(precision):
    dtype = torch.float64 if precision == "32-true" else torch.float32
    module = Net(dtype)
    fit(module, plugins=[amp_precision(precision, "cpu")])
    expected, _, _ = plain(dtype, precision)
    assert maxdiff(params(module), expected) <= EXACT


def test_16_mixed_ascent_overflow_still_skips_the_step():
    # the plugin unscales before clipping; an overflow of the pass at θ (the ascent) must still skip the step
    class Overflowing(Net):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss if self.optimizers().is_perturbed else loss * float("inf")

    module = Overflowing(torch.float32)
    before = params(module)
    trainer = fit(module, plugins=[amp_precision("16-mixed", "cpu")], max_steps=1, gradient_clip_val=CLIP)
    assert torch.equal(params(module), before)
    assert trainer.precision_plugin.scaler.get_scale() == 2.0 ** 16 / 2  # backed off once


def test_stock_16_mixed_cannot_step_amp():
    # before: Lightning's MixedPrecision calls the closure itself, then scaler.step(optimizer) without one
    with pytest.raises(ValueError, match="AMP.step needs a closure"):
        fit(Net(torch.float32), plugins=[MixedPrecision("16-mixed", "cpu")])


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_clipping_clips_the_final_unscaled_gradient_only(precision):
    dtype = torch.float64 if precision == "32-true" else torch.float32
    expected, _, _ = plain(dtype, precision, clip=CLIP)
    unclipped, _, _ = plain(dtype, precision)
    assert maxdiff(expected, unclipped) > FAR  # the clip acts
    module = Net(dtype)
    fit(module, plugins=[amp_precision(precision, "cpu")], gradient_clip_val=CLIP)
    assert maxdiff(params(module), expected) <= EXACT
    if precision == "32-true":  # before: the stock plugin clips inside the closure, the ascent gradient too
        stock = Net(dtype)
        fit(stock, gradient_clip_val=CLIP)
        assert maxdiff(params(stock), expected) > FAR


def test_on_before_optimizer_step_runs_once_per_step_on_the_final_gradient():
    seen = []

    class Hooked(Net):
        def on_before_optimizer_step(self, optimizer):
            seen.append((optimizer.is_perturbed, self.global_step))

    fit(Hooked(), plugins=[AMPPrecision()])
    assert seen == [(True, i) for i in range(STEPS)]  # once per step, at θ + Δ: the gradient the step uses


def test_accumulate_grad_batches_is_refused_with_the_recipe():
    data = dataset(torch.float64, steps=2)
    (x1, y1), (x2, y2) = batches(torch.float64, steps=2)
    exact = accumulated_plain([(x1, y1), (x2, y2)])
    # before: the stock plugin runs, silently: the step is an AMP step on the second micro-batch with loss / 2
    stock = Net()
    fit(stock, data=data, accumulate_grad_batches=2)
    second_only = plain(data=[(x2, y2)], dtype=torch.float64)[0]
    halved = plain_halved(x2, y2)
    assert maxdiff(params(stock), halved) <= EXACT
    assert maxdiff(params(stock), exact) > FAR and maxdiff(halved, second_only) > FAR
    # after: a clear error, before any parameter changes
    module = Net()
    before = params(module)
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=2\).*must be 1.*manual optimization"):
        fit(module, data=data, accumulate_grad_batches=2, plugins=[AMPPrecision()])
    assert torch.equal(params(module), before)


def plain_halved(x, y):
    net = mlp(torch.float64)
    opt = AMP(net.parameters(), **HP)

    def closure():
        loss = loss_of(net, x, y) / 2
        loss.backward()
        return loss

    opt.step(closure)
    return params(net)


def accumulated_plain(micro):
    """The exact accumulated AMP step: every micro-batch at θ, first_step, every micro-batch at θ + Δ."""
    net = mlp(torch.float64)
    opt = AMP(net.parameters(), **HP)
    for _ in range(2):
        for x, y in micro:
            (loss_of(net, x, y) / len(micro)).backward()
        (opt.first_step if not opt.is_perturbed else opt.second_step)(zero_grad=True)
    return params(net)


class ManualAccumulation(pl.LightningModule):
    """The supported recipe for accumulation: one training_step per optimizer step, its batch split in
    micro-batches, both passes over all of them."""

    def __init__(self, micro=2):
        super().__init__()
        self.net, self.micro, self.automatic_optimization = mlp(torch.float64), micro, False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        chunks = list(zip(*(t.chunk(self.micro) for t in batch)))
        for x, y in chunks:  # at θ
            self.manual_backward(loss_of(self.net, x, y) / self.micro)
        opt.first_step(zero_grad=True)
        for x, y in chunks:  # at θ + Δ
            self.manual_backward(loss_of(self.net, x, y) / self.micro)
        opt.step()  # the second step, counted by Lightning
        opt.zero_grad()

    def configure_optimizers(self):
        return AMP(self.parameters(), **HP)


def test_manual_accumulation_recipe_equals_the_accumulated_step():
    data = dataset(torch.float64, steps=1, batch=2 * BATCH)
    module = ManualAccumulation()
    trainer = fit(module, data=data, batch_size=2 * BATCH, plugins=[AMPPrecision()])
    x, y = data[:]
    expected = accumulated_plain([(x[:BATCH], y[:BATCH]), (x[BATCH:], y[BATCH:])])
    assert trainer.global_step == 1
    assert maxdiff(params(module), expected) <= EXACT


# -- logging: the loss at θ -------------------------------------------------------------------------------------
def logged(logger, key):
    return torch.tensor([m[key] for m in logger.metrics if key in m], dtype=torch.float64)


def test_logged_loss_and_outputs_are_the_loss_at_theta():
    _, theta, _ = plain()
    # before: logged on every pass with the stock plugin, the step's value is the loss at θ + Δ
    stock, stock_log = Net(log_theta=False), Recorder()
    fit(stock, logger=stock_log)
    assert maxdiff(logged(stock_log, "train_loss_step"), theta) > FAR
    assert maxdiff(torch.stack(stock.outputs), theta) > FAR
    assert abs(logged(stock_log, "train_loss_epoch").item() - theta.mean().item()) > FAR  # both passes averaged
    # after: logged from the pass at θ (is_perturbed), outputs from the pass at θ (the plugin)
    module, log = Net(), Recorder()
    fit(module, logger=log, plugins=[AMPPrecision()])
    assert maxdiff(logged(log, "train_loss_step"), theta) <= EXACT
    assert maxdiff(torch.stack(module.outputs), theta) <= EXACT
    assert abs(logged(log, "train_loss_epoch").item() - theta.mean().item()) <= EXACT


# -- manual optimization: the two-call API as an optimizer step -------------------------------------------------
class TwoCall(pl.LightningModule):
    def __init__(self, second="step"):
        super().__init__()
        self.net, self.second, self.automatic_optimization = mlp(torch.float64), second, False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        self.manual_backward(loss_of(self.net, *batch))
        opt.first_step(zero_grad=True, scaler=getattr(self.trainer.precision_plugin, "scaler", None))
        self.manual_backward(loss_of(self.net, *batch))
        if self.second == "step":
            opt.step()  # with the plugin: second_step(), counted by Lightning
        else:
            opt.second_step()
        opt.zero_grad()
        self.lr_schedulers().step()

    def configure_optimizers(self):
        opt = AMP(self.parameters(), **HP)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


def test_manual_step_without_closure_or_first_step_says_what_to_do():
    class Bare(TwoCall):
        def training_step(self, batch, batch_idx):
            self.optimizers().step()

    with pytest.raises(ValueError, match="needs a pending first_step\\(\\): pass the closure"):
        fit(Bare(), plugins=[AMPPrecision()])


class ManualClosure(TwoCall):
    def training_step(self, batch, batch_idx):
        def closure():
            loss = loss_of(self.net, *batch)
            self.manual_backward(loss)
            return loss

        self.optimizers().step(closure)
        self.lr_schedulers().step()


def test_manual_closure_step_equals_the_plain_loop():
    expected, _, _ = plain(sched=True)
    module = ManualClosure()
    assert fit(module, plugins=[AMPPrecision()]).global_step == STEPS
    assert maxdiff(params(module), expected) <= EXACT


def sched_warnings(record):
    return [w for w in record if "before `optimizer.step()`" in str(w.message)]


def test_two_call_api_counts_as_an_optimizer_step():
    expected, _, lr = plain(clip=None, sched=True)
    # before: second_step() is invisible to Lightning, so global_step stays 0 and max_steps never acts
    stock = TwoCall(second="second_step")
    assert fit(stock, plugins=[AMPPrecision()]).global_step == 0
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        module = TwoCall()
        trainer = fit(module, plugins=[AMPPrecision()])
    assert trainer.global_step == STEPS
    assert not sched_warnings(record)
    assert maxdiff(params(module), expected) <= EXACT
    assert trainer.optimizers[0].param_groups[0]["lr"] == lr == HP["lr"] * 0.5 ** STEPS
    assert fit(TwoCall(), plugins=[AMPPrecision()], max_steps=2, max_epochs=-1).global_step == 2  # max_steps acts


def test_second_step_counts_for_torch_lr_scheduler():
    # plain torch: a scheduler stepped after first_step / second_step must not warn, also when a wrapper that
    # runs the methods with another self (LightningOptimizer) makes the calls
    from lightning.pytorch.core.optimizer import LightningOptimizer

    for wrap, second in [(False, "second_step"), (True, "second_step"), (False, "step")]:
        net = mlp(torch.float64)
        opt = AMP(net.parameters(), **HP)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
        handle = LightningOptimizer(opt) if wrap else opt
        (x, y), = batches(torch.float64, steps=1)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            loss_of(net, x, y).backward()
            handle.first_step(zero_grad=True)
            loss_of(net, x, y).backward()
            getattr(handle, second)()  # step() without a closure after first_step() is second_step()
            assert not opt.is_perturbed
            sched.step()
        assert not sched_warnings(record), (wrap, second)


def test_two_call_resume_restores_the_lr_schedule_exactly(tmp_path):
    whole = TwoCall()
    fit(whole, max_epochs=2, plugins=[AMPPrecision()])
    first = TwoCall()
    trainer = fit(first, max_epochs=1, plugins=[AMPPrecision()])
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = TwoCall()
    with torch.no_grad():  # the checkpoint must restore the weights: start the fresh module elsewhere
        for p in resumed.parameters():
            p.add_(1.0)
    trainer = fit(resumed, max_epochs=2, plugins=[AMPPrecision()], ckpt_path=tmp_path / "epoch1.ckpt")
    assert trainer.global_step == 2 * STEPS
    assert trainer.optimizers[0].param_groups[0]["lr"] == HP["lr"] * 0.5 ** (2 * STEPS)
    assert torch.equal(params(resumed), params(whole))


# -- 3. DDP: 2 CPU processes ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_two_processes_equal_single_process_amp_on_the_global_batch(tmp_path):
    import os

    import lightning_ddp_script as script

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(script.__file__),
                                                       os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, script.__file__, str(tmp_path)], check=True, timeout=300, env=env,
                   cwd=tmp_path, capture_output=True)
    expected, losses = script.single_process()
    for rank in range(script.WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["global_step"] == script.STEPS
        assert maxdiff(got["params"], expected) <= 1e-12, rank  # float64; the all-reduce order is rounding
        assert maxdiff(got["losses"], losses) <= 1e-12, rank
