"""The demo (python -m bench.demo): its whole entry point on tiny settings, the ECE and timing it reports, its
command-line errors, and that it lives in bench/ beside the library, not in the installed package."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a top-level package of the repository, not part of the installed one
    sys.path.insert(0, str(ROOT))

from bench import demo  # noqa: E402
from bench.report import format_table  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- where the demo lives ---------------------------------------------------------------------------------------


def test_the_installed_package_has_no_demo_and_ships_no_bench():
    assert importlib.util.find_spec("amp_fused.demo") is None
    assert Path(demo.__file__).resolve() == ROOT / "bench" / "demo.py"
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert isinstance(packages, list) and "amp_fused" in packages  # listed, not discovered
    assert not [p for p in packages if p == "bench" or p.startswith("bench.")]


def test_the_tables_are_bench_format_table_without_its_rule():
    stat = {"mean": 0.0123, "std": 0.0045}
    row = {key: stat for key in ("error", "nll", "ece", "time_per_step", "cpu_time_per_step", "time_ratio",
                                 "cpu_time_ratio", "nll_change", "ece_change", "error_change")}
    summary = {"erm": row, "amp-k4-reuse": row}
    text = demo.table(summary, "test")
    lines = text.splitlines()
    assert lines[0].split("  ")[0] == "run" and lines[0].endswith("x ERM  CPU time x ERM")
    assert not any(set(line) == {"-"} for line in lines)  # no rule under the header
    assert [line.split()[0] for line in lines[1:]] == ["erm", "amp-k4-reuse"]
    assert lines[1].startswith("erm          ") and lines[1].endswith("0.01 ± 0.00")  # run left, numbers right
    assert len({len(line) for line in lines}) == 1
    columns = [(h, "<" if i == 0 else ">") for i, h in enumerate(
        ["run", "test error %", "test NLL", "ECE %", "ms/step", "x ERM", "CPU time x ERM"])]
    cells = [[name, "1.23 ± 0.45", "0.012 ± 0.004", "1.23 ± 0.45", "12.300 ± 4.500", "0.01 ± 0.00",
              "0.01 ± 0.00"] for name in summary]
    assert text == format_table(columns, cells, rule=False)
    ruled = format_table(columns, cells).splitlines()
    assert ruled[1] == "-" * len(ruled[0]) and ruled[:1] + ruled[2:] == lines  # bench's own tables keep theirs
    gains = demo.gain_table(summary, "test").splitlines()
    assert len(gains) == 2 and gains[0].startswith("vs erm (paired by seed) ") and gains[0].endswith("Δ error %")
    assert gains[1].startswith("amp-k4-reuse ") and gains[1].endswith("1.23 ± 0.45")  # no rule here either


def predictions(confidences, predicted, classes=4):
    """Softmax-like rows whose winning score is ``confidences[i]`` at class ``predicted[i]``."""
    probs = torch.empty(len(confidences), classes, dtype=torch.float64)
    for row, (p, k) in enumerate(zip(confidences, predicted)):
        probs[row] = (1 - p) / (classes - 1)
        probs[row, k] = p
        assert probs[row].max() == p and probs[row].argmax() == k
    return probs


def labelled(confidences, correct, classes=4):
    """Predictions of class 0 with the given confidences; the label is 0 where ``correct`` else 1."""
    probs = predictions(confidences, [0] * len(confidences), classes)
    return probs, torch.tensor([0 if ok else 1 for ok in correct])


# -- ECE --------------------------------------------------------------------------------------------------------


def test_ece_hand_computed():
    # bin 15 = (14/15, 1]: four predictions at 0.95, three right: |0.75 - 0.95| = 0.2
    # bin 9 = (8/15, 9/15]: two at 0.55, both right:             |1.00 - 0.55| = 0.45
    # ECE = 4/6 * 0.2 + 2/6 * 0.45 = 1.7 / 6
    probs, labels = labelled([0.95, 0.95, 0.95, 0.95, 0.55, 0.55], [True, True, True, False, True, True])
    assert demo.expected_calibration_error(probs, labels) == pytest.approx(1.7 / 6, abs=1e-12)
    bins = demo.calibration(probs, labels)
    assert bins.counts[14] == 4 and bins.counts[8] == 2 and sum(bins.counts) == 6


def test_ece_of_a_calibrated_toy_is_zero_and_of_a_shifted_one_is_the_shift():
    # 10 predictions at 0.8 with 8 right and 4 at 0.5 with 2 right: every bin's accuracy equals its confidence.
    conf = [0.8] * 10 + [0.5] * 4
    correct = [True] * 8 + [False] * 2 + [True, False, True, False]
    probs, labels = labelled(conf, correct)
    assert demo.expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)
    # The same predictions with two of the 0.8 ones wrong instead of right: that bin is 0.2 overconfident.
    correct = [True] * 6 + [False] * 4 + [True, False, True, False]
    probs, labels = labelled(conf, correct)
    assert demo.expected_calibration_error(probs, labels) == pytest.approx(10 / 14 * 0.2, abs=1e-12)


def test_ece_bins_so_that_over_and_under_confidence_do_not_cancel():
    # 10 at 0.9 all right (0.1 underconfident), 10 at 0.6 half right (0.1 overconfident): overall accuracy and
    # confidence are both 0.75, but the binned error is 0.1.
    probs, labels = labelled([0.9] * 10 + [0.6] * 10, [True] * 10 + [True, False] * 5)
    assert demo.expected_calibration_error(probs, labels) == pytest.approx(0.1, abs=1e-12)


def test_ece_bins_are_closed_on_the_right():
    # With 4 bins, 0.5 belongs to (0.25, 0.5] together with 0.4: acc 0.5, conf 0.45, ECE 0.05.
    # Left-closed bins would separate them and give (0.5 + 0.4) / 2 = 0.45.
    probs, labels = labelled([0.5, 0.4], [True, False])
    assert demo.expected_calibration_error(probs, labels, n_bins=4) == pytest.approx(0.05, abs=1e-12)
    assert demo.calibration(probs, labels, n_bins=4).counts == [0, 2, 0, 0]
    probs, labels = labelled([1.0], [False])
    assert demo.calibration(probs, labels, n_bins=4).counts == [0, 0, 0, 1]


def test_ece_matches_the_definition_written_as_a_loop():
    gen = torch.Generator().manual_seed(3)
    probs = torch.softmax(2.5 * torch.randn(500, 10, generator=gen, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 10, (500,), generator=gen)
    n_bins = 15
    expected = 0.0
    conf, pred = probs.max(dim=1)
    for m in range(1, n_bins + 1):
        members = [i for i in range(len(labels)) if (m - 1) / n_bins < conf[i].item() <= m / n_bins]
        if members:
            acc = sum(float(pred[i] == labels[i]) for i in members) / len(members)
            mean_conf = sum(conf[i].item() for i in members) / len(members)
            expected += len(members) / len(labels) * abs(acc - mean_conf)
    assert expected > 0.2  # random labels: far from calibrated, so the comparison is not vacuous
    assert demo.expected_calibration_error(probs, labels, n_bins) == pytest.approx(expected, rel=1e-12)


def test_calibration_bins_add_up_over_seeds():
    first = labelled([0.95, 0.55], [True, False])
    second = labelled([0.95, 0.95, 0.35], [False, True, True])
    both = (torch.cat([first[0], second[0]]), torch.cat([first[1], second[1]]))
    merged = demo.calibration(*first).merged(demo.calibration(*second))
    assert merged.ece == pytest.approx(demo.expected_calibration_error(*both), abs=1e-12)
    assert merged.counts == demo.calibration(*both).counts


def test_calibration_rejects_bad_input():
    probs, labels = labelled([0.9, 0.8], [True, True])
    with pytest.raises(ValueError, match="probs must be"):
        demo.calibration(probs[0], labels)
    with pytest.raises(ValueError, match="n_bins must be >= 1"):
        demo.calibration(probs, labels, n_bins=0)


# -- timing -----------------------------------------------------------------------------------------------------


def test_step_time_is_amortised_over_the_schedule_period():
    # perturb_every=4: a full step of 5 ms, then three of 1 ms. The amortised cost is 2 ms per step; the median
    # of all steps would say 1 ms.
    times = [0.005, 0.001, 0.001, 0.001] * 10
    assert demo.amortised_step_time(times, period=4, warmup_steps=8) == pytest.approx(0.002)
    # Outliers (another process's time slice) do not move it, in a full step or in a cheap one.
    times[12], times[21] = 0.050, 0.030
    assert demo.amortised_step_time(times, period=4, warmup_steps=8) == pytest.approx(0.002)
    # A time slice lost to another process in every period, at a different cheap step each time, is what a long
    # period meets on a busy machine and a one-step ERM period mostly does not: it must not count either.
    times = [0.005, 0.001, 0.001, 0.001] * 12
    for period in range(12):
        times[4 * period + 1 + period % 3] += 0.004
    assert demo.amortised_step_time(times, period=4, warmup_steps=0) == pytest.approx(0.002)
    # The warm-up is left out in whole periods, so positions keep their meaning: with 9 warm-up steps the
    # first period counted starts at step 10, a full step.
    times = [0.050] * 10 + [0.003, 0.001] * 20
    assert demo.amortised_step_time(times, period=2, warmup_steps=9) == pytest.approx(0.002)
    assert demo.amortised_step_time([0.004, 0.001, 0.003], period=1, warmup_steps=0) == pytest.approx(0.003)
    with pytest.raises(ValueError, match="whole period"):
        demo.amortised_step_time([0.001] * 3, period=4, warmup_steps=0)


# -- data and runs ----------------------------------------------------------------------------------------------


def test_tuning_evaluates_on_part_of_the_training_split_only():
    labels = torch.arange(1797) % 10
    train, test = demo.digits_indices(labels, 0.15, seed=1)
    fit, val = demo.digits_indices(labels, 0.15, seed=1, validation_fraction=0.3)
    assert set(fit.tolist()) | set(val.tolist()) == set(train.tolist())
    assert not set(fit.tolist()) & set(val.tolist())
    assert not set(val.tolist()) & set(test.tolist())
    assert len(val) == pytest.approx(0.3 * len(train), abs=1)
    assert torch.bincount(labels[val], minlength=10).min() >= 2  # stratified: every class is there


def test_spiral_classes_are_two_interleaved_arms():
    x, y = demo.spiral(2000, 0.0, torch.Generator().manual_seed(0))
    assert torch.bincount(y).tolist() == [1000, 1000]
    radius = x.norm(dim=1)
    assert radius.min() >= 0.15 - 1e-6 and radius.max() <= 1 + 1e-6
    # Without noise the arms are point reflections of each other: the class-1 arm is the class-0 arm turned by π.
    angle = torch.atan2(x[:, 1], x[:, 0])
    t = (radius - 0.15) / 0.85
    arm = torch.remainder(angle - 3 * math.pi * t - math.pi * y, 2 * math.pi)
    assert torch.minimum(arm, 2 * math.pi - arm).max() < 1e-4


def test_run_names():
    assert demo.run_spec("erm") == demo.RunSpec("erm")
    assert demo.run_spec("amp") == demo.RunSpec("amp", perturb_every=1)
    assert demo.run_spec("amp-k8-reuse") == demo.RunSpec("amp-k8-reuse", perturb_every=8, between="reuse")
    for bad in ("sam", "amp-k1-erm", "amp-k2-sgd", "amp-k-erm"):
        with pytest.raises(ValueError, match="is not a run"):
            demo.run_spec(bad)


# -- the entry point --------------------------------------------------------------------------------------------


def table_rows(stdout, header="run "):
    """The rows of the table whose header line starts with ``header``, by run name."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        name = line.split("  ")[0].strip()
        rows[name] = line
    return rows


def check_record(record, path, runs, seeds):
    on_disk = json.loads(path.read_text())
    assert on_disk["summary"].keys() == set(runs) == on_disk["per_seed"].keys()
    assert list(record["summary"]) == list(runs)
    for name in runs:
        row = on_disk["summary"][name]
        assert 0 <= row["error"]["mean"] <= 1 and row["nll"]["mean"] > 0 and 0 <= row["ece"]["mean"] <= 1
        assert row["time_per_step"]["mean"] > 0 and row["cpu_time_per_step"]["mean"] > 0
        assert row["time_ratio"]["mean"] > 0 and row["cpu_time_ratio"]["mean"] > 0
        assert len(on_disk["per_seed"][name]) == seeds
        assert sum(on_disk["per_seed"][name][0]["calibration"]["counts"]) > 0
    assert on_disk["summary"]["erm"]["time_ratio"]["mean"] == pytest.approx(1.0)
    assert on_disk["summary"]["erm"]["cpu_time_ratio"]["mean"] == pytest.approx(1.0)
    for figure in on_disk["figures"]:
        with open(figure, "rb") as png:
            assert png.read(8) == PNG_MAGIC
    return on_disk


def test_demo_digits_all_runs(tmp_path, capsys):
    record = demo.main(["--epochs", "1", "--seeds", "1", "--out", str(tmp_path / "figs"),
                        "--json", str(tmp_path / "digits.json"), "--no-progress"])
    stdout = capsys.readouterr().out
    assert set(table_rows(stdout)) == set(demo.DEFAULT_RUNS)
    on_disk = check_record(record, tmp_path / "digits.json", demo.DEFAULT_RUNS, seeds=1)
    assert (tmp_path / "figs" / "digits_curves_reliability.png").is_file()
    assert on_disk["config"]["epsilon"] == demo.PRESETS["digits"].epsilon
    assert "amp: " in stdout and "amp-k4-reuse: " in stdout  # the two timing targets are reported
    assert set(table_rows(stdout, "vs erm")) == set(demo.DEFAULT_RUNS[1:])  # paired changes against ERM


def test_demo_spiral_two_seeds(tmp_path, capsys):
    runs = ("erm", "amp", "amp-k4-reuse")
    threads = torch.get_num_threads()
    record = demo.main(["--dataset", "spiral", "--epochs", "2", "--seeds", "2", "--runs", ",".join(runs),
                        "--epsilon", "0.02", "--out", str(tmp_path), "--json", str(tmp_path / "spiral.json"),
                        "--no-progress"])
    rows = table_rows(capsys.readouterr().out)
    assert set(rows) == set(runs)
    assert all("±" in row for row in rows.values())  # two seeds: mean ± std
    on_disk = check_record(record, tmp_path / "spiral.json", runs, seeds=2)
    assert on_disk["config"]["epsilon"] == 0.02
    assert (tmp_path / "spiral_boundaries.png").is_file()
    assert len(on_disk["per_seed"]["amp"][1]["eval_loss"]) == 2
    assert record["environment"]["threads"] == 1
    assert torch.get_num_threads() == threads  # main puts the caller's thread count back


def test_tune_scores_the_grid_on_the_validation_split(tmp_path, capsys):
    record = demo.main(["--tune", "--dataset", "spiral", "--epochs", "1", "--seeds", "1", "--out", str(tmp_path),
                        "--no-progress"])
    stdout = capsys.readouterr().out
    grid = {f"amp e={e:g} z={z:g}" for e in demo.TUNE_EPSILONS for z in demo.TUNE_INNER_LRS}
    assert set(table_rows(stdout)) == {"erm"} | grid
    assert record["evaluated_on"] == "val" and "val NLL" in stdout and "test" not in stdout
    best = min(grid, key=lambda name: record["summary"][name]["nll"]["mean"])
    epsilon, zeta = (float(part[2:]) for part in best.split()[1:])
    assert f"lowest validation NLL: epsilon={epsilon:g}, zeta={zeta:g}" in stdout
    assert record["figures"] == [] and not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv, fragments", [
    (["--epochs", "0"], ["argument --epochs: must be an integer >= 1, got '0'"]),
    (["--seeds", "two"], ["argument --seeds: must be an integer >= 1, got 'two'"]),
    (["--threads", "0"], ["argument --threads: must be an integer >= 1, got '0'"]),
    (["--runs", "erm,sam"], ["argument --runs: 'sam' is not a run; use erm (plain SGD), amp", "amp-k<K>-<erm|reuse>"]),
    (["--runs", "amp-k1-erm"], ["argument --runs: 'amp-k1-erm' is not a run", "perturb_every=K >= 2"]),
    (["--runs", "erm,erm"], ["argument --runs: lists a run twice"]),
    (["--runs", ","], ["argument --runs: needs at least one run"]),
    (["--dataset", "mnist"], ["argument --dataset: invalid choice: 'mnist'", "digits", "spiral"]),
    (["--norm", "l1"], ["argument --norm: invalid choice: 'l1'", "per_tensor", "global"]),
    (["--backend", "numpy"], ["argument --backend: invalid choice: 'numpy'", "auto", "foreach"]),
    (["--backend", "cuda"], ["argument --backend: 'cuda' cannot run here", "choose from auto, "]),
    (["--epsilon", "-0.1"], ["argument --epsilon: must be a number > 0, got '-0.1'"]),
    (["--inner-lr", "nan"], ["argument --inner-lr: must be a number > 0, got 'nan'"]),
    (["--lr", "fast"], ["argument --lr: must be a number > 0, got 'fast'"]),
    (["--train-fraction", "1.5"], ["argument --train-fraction: must be a number in (0, 1), got '1.5'"]),
    (["--tune", "--runs", "amp", "--epsilon", "0.1"], ["argument --tune:", "so it takes no --runs, --epsilon"]),
])
def test_bad_flags_name_the_flag_and_the_allowed_values(argv, fragments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err
