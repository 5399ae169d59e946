"""ERM vs exact AMP vs amortised AMP on small real data, on the CPU.

    python -m bench.demo                         # digits, 3 seeds: the table, a PNG and (with --json) all numbers
    python -m bench.demo --dataset spiral        # the paper's Figure 6: decision boundaries of ERM and AMP
    python -m bench.demo --tune                  # choose epsilon and zeta on a validation split of the training set

digits: scikit-learn's bundled 8x8 scans (1,797 images, no download), a stratified 15% training split (so plain
ERM overfits) normalised with training statistics only, and a small CNN. spiral: the two-class spiral of the
paper's Figure 6 (generated), a small MLP. Within a seed every run starts from the same weights and sees the same
batches, so the runs differ only in the optimizer; the runs advance epoch by epoch in turn, so a change in the
load of a shared machine reaches all of them alike.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from amp_fused import AMP, backends

from .report import format_table

# -- the runs ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One training configuration: ERM (``perturb_every`` None) or AMP with a schedule."""
    name: str
    perturb_every: int | None = None
    between: str = "erm"
    epsilon: float | None = None  # None: the command line's --epsilon / --inner-lr
    inner_lr: float | None = None

    @property
    def is_amp(self) -> bool:
        return self.perturb_every is not None


DEFAULT_RUNS = ("erm", "amp", "amp-k2-erm", "amp-k2-reuse", "amp-k4-erm", "amp-k4-reuse")
_AMORTISED = re.compile(r"amp-k(\d+)-(erm|reuse)")
RUNS_HELP = ("erm (plain SGD), amp (exact AMP: every step perturbs) or amp-k<K>-<erm|reuse> (perturb_every=K >= 2, "
             "between erm or reuse)")


def run_spec(name: str) -> RunSpec:
    if name == "erm":
        return RunSpec("erm")
    if name == "amp":
        return RunSpec("amp", perturb_every=1)
    match = _AMORTISED.fullmatch(name)
    if match is None or int(match[1]) < 2:
        raise ValueError(f"{name!r} is not a run; use {RUNS_HELP}")
    return RunSpec(name, perturb_every=int(match[1]), between=match[2])


# -- data ----------------------------------------------------------------------------------------------------


@dataclass
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_eval: torch.Tensor  # the test set, or with --tune the validation part carved from the training set
    y_eval: torch.Tensor


def _stratified(y: torch.Tensor, train_size: float, seed: int):
    from sklearn.model_selection import train_test_split

    idx = torch.arange(len(y)).numpy()
    first, second = train_test_split(idx, train_size=train_size, stratify=y.numpy(), random_state=seed)
    return torch.from_numpy(first), torch.from_numpy(second)


def _digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.images, dtype=torch.float32).unsqueeze(1), torch.tensor(data.target, dtype=torch.long)


def digits_indices(labels: torch.Tensor, train_fraction: float, seed: int, validation_fraction: float | None = None):
    """Indices of the training images and of the evaluation images: a stratified train/test split, or with
    ``validation_fraction`` that share of the training split (so the test images are never used)."""
    train, test = _stratified(labels, train_fraction, seed)
    if validation_fraction is None:
        return train, test
    fit, val = _stratified(labels[train], 1 - validation_fraction, seed)
    return train[fit], train[val]


def digits_split(train_fraction: float, seed: int, validation_fraction: float | None = None) -> Split:
    x, y = _digits()
    train, test = digits_indices(y, train_fraction, seed, validation_fraction)
    mean, std = x[train].mean(), x[train].std()  # training statistics only
    return Split((x[train] - mean) / std, y[train], (x[test] - mean) / std, y[test])


def spiral(n: int, noise: float, generator: torch.Generator):
    """Two interleaved spiral arms, one per class (a 2-D two-class problem as in the paper's Figure 6):
    radius grows linearly over 1.5 turns, with isotropic Gaussian noise."""
    label = torch.arange(n) % 2
    t = torch.rand(n, generator=generator)
    angle = 3 * math.pi * t + math.pi * label
    radius = 0.15 + 0.85 * t
    x = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    return x + noise * torch.randn(n, 2, generator=generator), label


SPIRAL_TRAIN, SPIRAL_TEST, SPIRAL_NOISE = 200, 2000, 0.07


def spiral_split(seed: int, validation_fraction: float | None = None) -> Split:
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = spiral(SPIRAL_TRAIN, SPIRAL_NOISE, gen)
    x_test, y_test = spiral(SPIRAL_TEST, SPIRAL_NOISE, gen)
    if validation_fraction is not None:
        fit, val = _stratified(y_train, 1 - validation_fraction, seed)
        return Split(x_train[fit], y_train[fit], x_train[val], y_train[val])
    return Split(x_train, y_train, x_test, y_test)


# -- models --------------------------------------------------------------------------------------------------


def digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def spiral_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))


@dataclass(frozen=True)
class Preset:
    epochs: int
    lr: float
    batch_size: int
    epsilon: float
    inner_lr: float


# Why these ε and ζ: ε is the radius of each parameter tensor's own L2 ball (norm="per_tensor"), so what matters
# is ε relative to the tensors' norms. The paper's ε = 0.5, ζ = 1 are for PreActResNet-18 on CIFAR, whose conv
# tensors hold up to 2.4M weights; the trained digits CNN's tensors have norms of about 0.2 (biases) to 9 (the
# 32K-weight linear layer), so ε = 0.5 would move biases and BatchNorm shifts by more than their own size. The
# values below had the lowest validation NLL of --tune --seeds 5 (validation carved from the training split; the
# test set is never used to choose): digits ε = 0.01, ζ = 0.5, where ε = 0.05 was no better than ERM and ε = 0.1
# with ζ >= 0.5 diverged; spiral ε = 0.1, ζ = 0.1 (its 60 validation points leave most of the grid within noise).
# With one ascent step Δ = ζ·g clipped to the ball, so ζ decides how far below ε a small gradient stays.
PRESETS = {
    "digits": Preset(epochs=40, lr=0.05, batch_size=32, epsilon=0.01, inner_lr=0.5),
    "spiral": Preset(epochs=300, lr=0.1, batch_size=32, epsilon=0.1, inner_lr=0.1),
}
MODELS = {"digits": digits_cnn, "spiral": spiral_mlp}
TUNE_EPSILONS = (0.005, 0.01, 0.02, 0.05, 0.1)
TUNE_INNER_LRS = (0.1, 0.5, 1.0)
VALIDATION_FRACTION = 0.3  # of the training split, with --tune
_DEFAULTS_TEXT = ", ".join(f"{name} {p.epsilon:g} and {p.inner_lr:g}" for name, p in PRESETS.items())
EPILOG = textwrap.fill(
    "epsilon and zeta: the paper's epsilon = 0.5, zeta = 1 are for PreActResNet-18 on CIFAR. Here epsilon is the "
    "radius of each parameter tensor's own ball (--norm per_tensor), and the trained digits CNN's tensors have norms "
    "of about 0.2 (biases) to 9 (the 32K-weight linear layer): 0.5 would move the small ones by more than their own "
    "size, and 0.1 with zeta >= 0.5 already diverges. The defaults "
    f"({_DEFAULTS_TEXT}) have the lowest validation NLL of --tune --seeds 5: ERM and exact AMP for epsilon in "
    f"{list(TUNE_EPSILONS)} and zeta in {list(TUNE_INNER_LRS)}, trained on {100 - int(100 * VALIDATION_FRACTION)}% "
    f"of the training split and scored on the other {int(100 * VALIDATION_FRACTION)}% (the test set is not used to "
    "choose anything).", width=100) + "\n\n" + textwrap.fill(
    "ms/step: wall time of whole optimizer steps (forward, backward, optimizer) after the first epoch: the "
    "median, and for a schedule with perturb_every=K the mean of the medians of its K step positions (one full "
    "AMP step and K-1 cheaper ones); x ERM is paired by seed. The CPU-time ratio is measured the same way with "
    "the process's CPU time, which other programs on a shared machine do not inflate.", width=100)

# -- calibration ---------------------------------------------------------------------------------------------


@dataclass
class Calibration:
    """Per-bin sums of the reliability diagram; bins add up across seeds."""
    counts: list
    confidence_sums: list
    correct_sums: list

    @property
    def ece(self) -> float:
        n = sum(self.counts)
        return sum(abs(c - s) for c, s in zip(self.correct_sums, self.confidence_sums)) / n if n else float("nan")

    def merged(self, other: "Calibration") -> "Calibration":
        return Calibration(*[[a + b for a, b in zip(mine, theirs)] for mine, theirs in
                             ((self.counts, other.counts), (self.confidence_sums, other.confidence_sums),
                              (self.correct_sums, other.correct_sums))])


def calibration(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> Calibration:
    """Bin the predictions by confidence (the winning softmax score) into ``n_bins`` equal-width bins
    I_m = ((m-1)/M, m/M] (supplement, Appendix D, after Guo et al. 2017)."""
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"probs must be (n, classes) and labels (n,), got {tuple(probs.shape)} and "
                         f"{tuple(labels.shape)}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    confidence, predicted = probs.double().max(dim=1)
    correct = (predicted == labels).double()
    # Right-closed bins: p lies in bin ceil(p·M) (1-based); p = 0 cannot win a softmax but goes to the first.
    index = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    return Calibration(torch.bincount(index, minlength=n_bins).tolist(),
                       torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, confidence).tolist(),
                       torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, correct).tolist())


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE = Σ_m |B_m|/n · |acc(B_m) − conf(B_m)| over ``n_bins`` equal-width confidence bins."""
    return calibration(probs, labels, n_bins).ece


# -- training ------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    dataset: str
    epochs: int
    seeds: int
    lr: float
    batch_size: int
    epsilon: float
    inner_lr: float
    norm: str
    backend: str
    train_fraction: float


class Run:
    """One model and its optimizer for one seed; ``train_epoch`` times every optimizer step."""

    def __init__(self, spec: RunSpec, settings: Settings, seed: int, steps_per_epoch: int):
        self.spec = spec
        torch.manual_seed(seed)  # the same initial weights for every run of this seed
        self.model = MODELS[settings.dataset]()
        sgd = dict(lr=settings.lr, momentum=0.9, weight_decay=1e-4)
        if spec.is_amp:
            epsilon = settings.epsilon if spec.epsilon is None else spec.epsilon
            inner_lr = settings.inner_lr if spec.inner_lr is None else spec.inner_lr
            self.optimizer = AMP(self.model.parameters(), epsilon=epsilon, inner_lr=inner_lr, norm=settings.norm,
                                 backend=settings.backend, perturb_every=spec.perturb_every, between=spec.between,
                                 **sgd)
        else:
            self.optimizer = torch.optim.SGD(self.model.parameters(), **sgd)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer,
                                                                    T_max=settings.epochs * steps_per_epoch)
        self.batch_order = torch.Generator().manual_seed(seed)  # the same batches for every run of this seed
        self.step_times: list[float] = []  # wall time
        self.step_cpu_times: list[float] = []  # CPU time of the process: what the step costs, preemption aside
        self.train_loss: list[float] = []  # per epoch
        self.eval_loss: list[float] = []
        self.eval_error: list[float] = []

    def train_epoch(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
        """One pass over (x, y); returns the mean training loss, read from the device once."""
        model, optimizer, amp = self.model, self.optimizer, self.spec.is_amp
        model.train()
        loss_sum = torch.zeros(())
        order = torch.randperm(len(y), generator=self.batch_order)
        for start in range(0, len(y), batch_size):
            idx = order[start:start + batch_size]
            xb, yb = x[idx], y[idx]

            def closure():
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            # The timed region is the whole step, forward and backward included, and nothing else.
            began, began_cpu = time.perf_counter(), time.process_time()
            if amp:
                loss = optimizer.step(closure)  # zero-grads before each of its closure calls
            else:
                optimizer.zero_grad()
                loss = closure()
                optimizer.step()
            self.step_times.append(time.perf_counter() - began)
            self.step_cpu_times.append(time.process_time() - began_cpu)
            loss_sum.add_(loss.detach(), alpha=len(idx))
            self.scheduler.step()
        return loss_sum.item() / len(y)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return self.model(x)

    def time_per_step(self, warmup_steps: int, cpu: bool = False) -> float:
        return amortised_step_time(self.step_cpu_times if cpu else self.step_times, self.spec.perturb_every or 1,
                                   warmup_steps)


def amortised_step_time(step_times, period: int, warmup_steps: int) -> float:
    """Amortised time per step of a schedule with one full AMP step every ``period`` steps: the median time of
    the steps at each position of the period (position 0 is the full step), averaged over the positions.

    The median of all steps together would pick the cheap steps' time and hide the full ones; medians of
    whole-period sums would, on a shared machine, count another process's time slice far more often in long
    periods than in the single-step periods of ERM."""
    start = -(-warmup_steps // period) * period  # periods start at steps 0, k, 2k, ...
    if start + period > len(step_times):
        start = 0  # too short a run to leave out a warm-up
    if len(step_times) < period:
        raise ValueError(f"need at least one whole period of {period} steps, got {len(step_times)} step times")
    return statistics.fmean(statistics.median(step_times[start + i::period]) for i in range(period))


@dataclass
class SeedResult:
    """One run for one seed: the metrics after the last epoch, the step times and the per-epoch curves."""
    error: float
    nll: float
    calibration: Calibration
    time_per_step: float  # wall time
    cpu_time_per_step: float
    train_loss: list
    eval_loss: list
    eval_error: list


def evaluation(logits: torch.Tensor, y: torch.Tensor):
    return (logits.argmax(1) != y).double().mean().item(), F.cross_entropy(logits, y).item()


def boundary_grid(limit: float = 1.45, points: int = 200):
    axis = torch.linspace(-limit, limit, points)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    return gx, gy, torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)


def train_all(specs: list[RunSpec], settings: Settings, validation: bool, progress: bool):
    """Every run for every seed; returns ``{run: [SeedResult per seed]}`` and, for the spiral, the first
    seed's class-1 probability on a grid per run (for the decision-boundary plot)."""
    from tqdm.auto import tqdm

    results = {spec.name: [] for spec in specs}
    boundaries = {}
    val = VALIDATION_FRACTION if validation else None
    bar = tqdm(total=settings.seeds * settings.epochs * len(specs), desc=f"{settings.dataset} training",
               unit="epoch", disable=not progress, dynamic_ncols=True)
    for seed in range(settings.seeds):
        split = (digits_split(settings.train_fraction, seed, val) if settings.dataset == "digits"
                 else spiral_split(seed, val))
        steps_per_epoch = -(-len(split.y_train) // settings.batch_size)
        runs = [Run(spec, settings, seed, steps_per_epoch) for spec in specs]
        for _epoch in range(settings.epochs):
            for run in runs:  # epoch by epoch in turn: load changes on the machine hit every run alike
                run.train_loss.append(run.train_epoch(split.x_train, split.y_train, settings.batch_size))
                error, nll = evaluation(run.logits(split.x_eval), split.y_eval)
                run.eval_loss.append(nll)
                run.eval_error.append(error)
                bar.set_postfix(seed=seed, run=run.spec.name, nll=f"{nll:.3f}", refresh=False)
                bar.update()
        warmup = steps_per_epoch if settings.epochs > 1 else 0  # the first epoch warms the allocator and caches
        for run in runs:
            probs = torch.softmax(run.logits(split.x_eval), dim=1)
            results[run.spec.name].append(SeedResult(
                run.eval_error[-1], run.eval_loss[-1], calibration(probs, split.y_eval), run.time_per_step(warmup),
                run.time_per_step(warmup, cpu=True), run.train_loss, run.eval_loss, run.eval_error))
            if settings.dataset == "spiral" and seed == 0 and not validation:
                boundaries[run.spec.name] = torch.softmax(run.logits(boundary_grid()[2]), dim=1)[:, 1]
    bar.close()
    return results, boundaries


# -- summaries -----------------------------------------------------------------------------------------------


def mean_std(values):
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def summarise(results, reference: str | None):
    """Mean ± std over seeds of every metric; ratios and differences to ``reference`` are paired by seed."""
    summary = {}
    for name, seeds in results.items():
        row = {
            "error": mean_std(r.error for r in seeds),
            "nll": mean_std(r.nll for r in seeds),
            "ece": mean_std(r.calibration.ece for r in seeds),
            "time_per_step": mean_std(r.time_per_step for r in seeds),
            "cpu_time_per_step": mean_std(r.cpu_time_per_step for r in seeds),
        }
        if reference is not None:
            ref = results[reference]
            row["time_ratio"] = mean_std(r.time_per_step / e.time_per_step for r, e in zip(seeds, ref))
            row["cpu_time_ratio"] = mean_std(r.cpu_time_per_step / e.cpu_time_per_step for r, e in zip(seeds, ref))
            row["nll_change"] = mean_std(r.nll - e.nll for r, e in zip(seeds, ref))
            row["ece_change"] = mean_std(r.calibration.ece - e.calibration.ece for r, e in zip(seeds, ref))
            row["error_change"] = mean_std(r.error - e.error for r, e in zip(seeds, ref))
        summary[name] = row
    return summary


def fmt(stat, scale=1.0, digits=2):
    text = f"{scale * stat['mean']:.{digits}f}"
    return text if stat["std"] is None else f"{text} ± {scale * stat['std']:.{digits}f}"


def table(summary, eval_name: str) -> str:
    has_ratio = all("time_ratio" in row for row in summary.values())
    columns = [("run", "<"), (f"{eval_name} error %", ">"), (f"{eval_name} NLL", ">"), ("ECE %", ">"),
               ("ms/step", ">")]
    columns += [("x ERM", ">"), ("CPU time x ERM", ">")] if has_ratio else []
    rows = []
    for name, row in summary.items():
        rows.append([name, fmt(row["error"], 100), fmt(row["nll"], 1, 3), fmt(row["ece"], 100),
                     fmt(row["time_per_step"], 1e3, 3)])
        if has_ratio:
            rows[-1] += [fmt(row["time_ratio"]), fmt(row["cpu_time_ratio"])]
    return format_table(columns, rows, rule=False)


def kept_share(change, full) -> str:
    """The share of exact AMP's mean gain (a negative change) a schedule keeps, where AMP has a gain: a mean
    drop larger than its spread over seeds."""
    if not (full["mean"] < 0 and (full["std"] is None or -full["mean"] > full["std"])):
        return "n/a"
    return f"{100 * change['mean'] / full['mean']:.0f}%"


def gain_table(summary, eval_name: str) -> str:
    """Paired changes against ERM and the share of exact AMP's gain each schedule keeps."""
    if "erm" not in summary or len(summary) < 2:
        return ""
    amp = summary.get("amp")
    columns = [("vs erm (paired by seed)", "<"), (f"Δ {eval_name} NLL", ">"), ("Δ ECE %", ">"), ("Δ error %", ">")]
    columns += [("NLL gain kept", ">"), ("ECE gain kept", ">")] if amp else []
    rows = []
    for name, row in summary.items():
        if name == "erm":
            continue
        cells = [name, fmt(row["nll_change"], 1, 3), fmt(row["ece_change"], 100), fmt(row["error_change"], 100)]
        if amp:
            cells += [kept_share(row[key], amp[key]) for key in ("nll_change", "ece_change")]
        rows.append(cells)
    return format_table(columns, rows, rule=False)


# -- plots ---------------------------------------------------------------------------------------------------


def plot_curves_and_reliability(results, eval_name: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, reliability) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name, seeds in results.items():
        main_run = name in ("erm", "amp")
        per_epoch = torch.tensor([r.eval_loss for r in seeds], dtype=torch.float64)
        epochs = range(1, per_epoch.shape[1] + 1)
        (line,) = curves.plot(epochs, per_epoch.mean(0), label=name, lw=1.8 if main_run else 1.0)
        if len(seeds) > 1:  # the range over seeds: stays positive on the log axis, unlike mean − std
            curves.fill_between(epochs, per_epoch.min(0).values, per_epoch.max(0).values, color=line.get_color(),
                                alpha=0.12, lw=0)
        pooled = seeds[0].calibration
        for r in seeds[1:]:
            pooled = pooled.merged(r.calibration)
        filled = [i for i, c in enumerate(pooled.counts) if c]
        confidence = [pooled.confidence_sums[i] / pooled.counts[i] for i in filled]
        accuracy = [pooled.correct_sums[i] / pooled.counts[i] for i in filled]
        reliability.plot(confidence, accuracy, "-", color=line.get_color(), lw=1.6 if main_run else 0.8,
                         alpha=1 if main_run else 0.6, label=f"{name} (ECE {100 * pooled.ece:.1f}%)")
        # Marker area shows how many predictions a bin holds: near-empty bins are noise.
        reliability.scatter(confidence, accuracy, s=[4 + 80 * math.sqrt(pooled.counts[i] / max(pooled.counts))
                                                     for i in filled],
                            color=line.get_color(), alpha=0.8, lw=0)
    curves.set(xlabel="epoch", ylabel=f"{eval_name} NLL", title=f"{eval_name} loss (mean over seeds, band: min to max)")
    curves.set_yscale("log")
    curves.legend(fontsize=8)
    n_bins = len(seeds[0].calibration.counts)
    reliability.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    reliability.set(xlabel="confidence (mean of the winning softmax score in the bin)",
                    ylabel="accuracy in the bin (marker size: predictions in it)",
                    title=f"reliability diagram ({n_bins} bins, seeds pooled)", xlim=(0, 1.02), ylim=(0, 1.02))
    reliability.legend(fontsize=8, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_boundaries(boundaries, results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gx, gy, _ = boundary_grid()
    train_x, train_y = spiral(SPIRAL_TRAIN, SPIRAL_NOISE, torch.Generator().manual_seed(0))  # seed 0's training set
    cols = min(3, len(boundaries))
    rows = -(-len(boundaries) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(boundaries):]:
        ax.axis("off")
    for ax, (name, prob) in zip(axes.flat, boundaries.items()):
        ax.contourf(gx, gy, prob.reshape(gx.shape), levels=20, cmap="RdBu_r", alpha=0.55, vmin=0, vmax=1)
        ax.contour(gx, gy, prob.reshape(gx.shape), levels=[0.5], colors="k", linewidths=1.2)
        ax.scatter(train_x[:, 0], train_x[:, 1], c=train_y, cmap="RdBu_r", s=9, edgecolors="k", linewidths=0.3)
        first = results[name][0]
        ax.set_title(f"{name}: test error {100 * first.error:.1f}%, NLL {first.nll:.3f}", fontsize=9)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("spiral, seed 0: decision boundary (black) and P(class 1); dots: training set")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command line --------------------------------------------------------------------------------------------


def _int_at_least(low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value
    return parse


def _float_in(low, high=math.inf):
    what = f"a number > {low}" if high == math.inf else f"a number in ({low}, {high})"

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not low < value < high:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    return parse


def _runs(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"needs at least one run: {RUNS_HELP}")
    specs = []
    for name in names:
        try:
            specs.append(run_spec(name))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"lists a run twice: {text!r}")
    return specs


def build_parser() -> argparse.ArgumentParser:
    def per_dataset(attr, unit=""):
        return "default " + ", ".join(f"{name} {getattr(p, attr)}{unit}" for name, p in PRESETS.items())

    parser = argparse.ArgumentParser(
        prog="python -m bench.demo", description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("--dataset", choices=tuple(PRESETS), default="digits",
                        help="digits (8x8 scans, small CNN) or spiral (two-class spiral of the paper's Fig. 6, MLP)")
    parser.add_argument("--seeds", type=_int_at_least(1), default=3,
                        help="seeds 0..N-1: split (digits) or sample (spiral), initial weights, batch order "
                             "(default 3)")
    parser.add_argument("--epochs", type=_int_at_least(1), help=per_dataset("epochs"))
    parser.add_argument("--runs", type=_runs, metavar="NAME,...",
                        help=f"comma-separated runs: {RUNS_HELP} (default {','.join(DEFAULT_RUNS)})")
    parser.add_argument("--epsilon", type=_float_in(0),
                        help="AMP radius epsilon (per tensor; see below), " + per_dataset("epsilon"))
    parser.add_argument("--inner-lr", type=_float_in(0), help="AMP ascent step zeta, " + per_dataset("inner_lr"))
    parser.add_argument("--norm", choices=("per_tensor", "global"), default="per_tensor",
                        help="project Delta per tensor (the original code; default) or over all tensors")
    parser.add_argument("--backend", choices=backends.CHOICES, default="auto",
                        help="AMP op backend (default auto: the fastest available for CPU tensors)")
    parser.add_argument("--lr", type=_float_in(0),
                        help="SGD learning rate (cosine schedule to 0), " + per_dataset("lr"))
    parser.add_argument("--batch-size", type=_int_at_least(1), help=per_dataset("batch_size"))
    parser.add_argument("--train-fraction", type=_float_in(0, 1), default=0.15,
                        help="digits: stratified share of the 1,797 images used for training (default 0.15)")
    parser.add_argument("--tune", action="store_true",
                        help="instead of the comparison: ERM and exact AMP over the epsilon x zeta grid, scored on "
                             "a validation split carved from the training set")
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="directory for the PNGs (default out/demo)")
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    parser.add_argument("--threads", type=_int_at_least(1), default=1,
                        help="torch intra-op threads (default 1: these tensors are too small to gain from more, "
                             "and on a busy machine threads that wait for each other make every op erratic)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tune:
        given = [flag for flag, value in (("--runs", args.runs), ("--epsilon", args.epsilon),
                                          ("--inner-lr", args.inner_lr)) if value is not None]
        if given:
            parser.error(f"argument --tune: runs ERM and exact AMP over its own epsilon x zeta grid, so it takes no "
                         f"{', '.join(given)}")
        args.runs = [RunSpec("erm")] + [RunSpec(f"amp e={e:g} z={z:g}", perturb_every=1, epsilon=e, inner_lr=z)
                                        for e in TUNE_EPSILONS for z in TUNE_INNER_LRS]
    elif args.runs is None:
        args.runs = [run_spec(name) for name in DEFAULT_RUNS]
    preset = PRESETS[args.dataset]
    for key in ("epochs", "lr", "batch_size", "epsilon", "inner_lr"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(preset, key))
    usable = ["auto"] + backends.available_backends("cpu")
    if args.backend not in usable:
        reason = backends.unavailable_reason(args.backend) or "it does not run on CPU tensors"
        parser.error(f"argument --backend: {args.backend!r} cannot run here ({reason}); choose from "
                     f"{', '.join(usable)}")
    return args


def main(argv=None):
    """Run the demo; returns everything written to ``--json``."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _demo(args)
    finally:
        torch.set_num_threads(threads)


def _demo(args):
    began = time.perf_counter()
    settings = Settings(args.dataset, args.epochs, args.seeds, args.lr, args.batch_size, args.epsilon, args.inner_lr,
                        args.norm, args.backend, args.train_fraction)
    backend = backends.resolve(args.backend, "cpu").NAME
    eval_name = "val" if args.tune else "test"
    print(f"{args.dataset}: {args.seeds} seed(s) x {args.epochs} epochs, lr {args.lr}, batch {args.batch_size}, "
          f"epsilon {args.epsilon}, zeta {args.inner_lr}, norm {args.norm}, AMP backend {backend}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU"
          + (f"; tuning on {int(100 * VALIDATION_FRACTION)}% of the training split" if args.tune else ""))
    results, boundaries = train_all(args.runs, settings, validation=args.tune, progress=not args.no_progress)
    reference = "erm" if "erm" in results else None
    summary = summarise(results, reference)

    print()
    print(table(summary, eval_name))
    gains = gain_table(summary, eval_name)
    if gains:
        print()
        print(gains)
    notes = []
    if reference is not None and not args.tune:
        fused = backend in ("cpu", "cuda", "triton")
        for name, target in (("amp", 2.05), ("amp-k4-reuse", 1.3)):
            if name in summary:
                ratio = summary[name]["time_ratio"]["mean"]
                notes.append(f"{name}: {ratio:.2f}x ERM wall time per step (target <= {target}x"
                             + ("" if fused or name != "amp" else f" with a fused backend; this ran {backend}")
                             + f"): {'met' if ratio <= target else 'not met'}; CPU time "
                             f"{summary[name]['cpu_time_ratio']['mean']:.2f}x")
    if args.tune:
        amp_runs = {n: row for n, row in summary.items() if n != "erm"}
        best = min(amp_runs, key=lambda n: amp_runs[n]["nll"]["mean"])
        spec = next(s for s in args.runs if s.name == best)
        notes.append(f"lowest validation NLL: epsilon={spec.epsilon:g}, zeta={spec.inner_lr:g} "
                     f"({fmt(summary[best]['nll'], 1, 3)} vs ERM {fmt(summary['erm']['nll'], 1, 3)})")
    print()
    for note in notes:
        print(note)

    figures = []
    if not args.tune:  # a grid of 16 runs makes no readable figure; its numbers are in the table and the JSON
        args.out.mkdir(parents=True, exist_ok=True)
        figures.append(args.out / f"{args.dataset}_curves_reliability.png")
        plot_curves_and_reliability(results, eval_name, figures[-1],
                                    f"{args.dataset}: {args.seeds} seed(s), {args.epochs} epochs, epsilon "
                                    f"{args.epsilon}, zeta {args.inner_lr}, AMP backend {backend}")
        if boundaries:
            figures.append(args.out / f"{args.dataset}_boundaries.png")
            plot_boundaries(boundaries, results, figures[-1])
        print(f"figures: {', '.join(map(str, figures))}")
    wall = time.perf_counter() - began
    print(f"wall time {wall:.1f} s")

    record = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "runs"},
        "runs": [vars(s) for s in args.runs],
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "backend": backend,
                        "cpu_count": os.cpu_count()},
        "evaluated_on": eval_name,
        "summary": summary,
        "per_seed": {name: [{"error": r.error, "nll": r.nll, "ece": r.calibration.ece,
                             "time_per_step": r.time_per_step, "cpu_time_per_step": r.cpu_time_per_step,
                             "train_loss": r.train_loss,
                             "eval_loss": r.eval_loss, "eval_error": r.eval_error,
                             "calibration": vars(r.calibration)} for r in seeds]
                     for name, seeds in results.items()},
        "notes": notes,
        "figures": [str(f) for f in figures],
        "wall_time_s": wall,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))
        print(f"numbers: {args.json}")
    return record


if __name__ == "__main__":
    main()
