"""The ``python -m bench`` command line, run in-process on tiny configurations (no timing value is asserted)."""
import contextlib
import importlib.metadata
import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch


from amp_fused import backends  # noqa: E402
from amp_fused.profiling import DispatchCounter  # noqa: E402
from bench import cli, host  # noqa: E402

AMP_BYTES, SGD_BYTES = 40, 20  # per fp32 parameter, as bench/optimizer_step.py's docstring derives them
OPTIMIZER_KEYS = {"params": str, "tensors": int, "numel": int, "backend": str, "ms": float, "gbps": float,
                  "floor_ms": float, "ops_per_step": int, "syncs_per_step": int}
TRAIN_KEYS = {"model": str, "batch": int, "mode": str, "backend": str, "ms": float, "ratio_vs_erm": float}
MACHINE_KEYS = ("cpu", "physical_cores", "torch_threads", "torch", "device", "date")
# Reported as installed, or None where they are not (torch's CPU-only wheels come without Triton).
OPTIONAL_PACKAGES = ("triton", "torchvision")


def run_main(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(argv) == 0
    return out.getvalue()


def check_png(path: Path):
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 300 and width > 600


def check_quartiles(row):
    assert row["q1_ms"] <= row["ms"] <= row["q3_ms"]
    assert row["iqr_ms"] == pytest.approx(row["q3_ms"] - row["q1_ms"])
    assert row["samples"] >= 1


def ops_of_one_step(name: str, count: int) -> tuple[int, int]:
    """(ops, syncs) of perturb_ + restore_sgd_ with backend ``name`` on ``count`` tensors, counted here."""
    ops = backends.resolve(name, "cpu")
    p, g, b, m = ([torch.randn(50) for _ in range(count)] for _ in range(4))
    with DispatchCounter() as counter:
        ops.perturb_(p, g, b, 0.05, 1.0, True, True)
        ops.restore_sgd_(p, b, g, m, 0.01, 0.9, 0.0, 5e-4, True, False, False)
    return counter.ops, counter.syncs


@pytest.fixture(scope="module")
def optimizer_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    stdout = run_main(["--sections", "optimizer_step", "--sets", "many_small", "--rounds", "1",
                       "--min-run-time", "0.01", "--json", str(out_dir / "o.json"), "--plot", str(out_dir / "o.png")])
    return stdout, json.loads((out_dir / "o.json").read_text()), out_dir / "o.png"


def test_optimizer_step_rows_are_consistent(optimizer_run):
    _, result, _ = optimizer_run
    assert set(result) >= {"machine", "config", "triad", "optimizer_step"} and "train_step" not in result
    assert all(result["machine"][k] is not None for k in MACHINE_KEYS)
    for package in OPTIONAL_PACKAGES:
        try:
            installed = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        assert result["machine"][package] == installed, package
    names = result["config"]["backends"]
    assert names[0] == "reference" and "foreach" in names
    rows = result["optimizer_step"]
    assert [r["backend"] for r in rows] == names + ["sgd_fused"]
    triad_bytes_per_s = result["triad"]["gbps"] * 1e9
    assert result["triad"]["min_gbps"] <= result["triad"]["gbps"] <= result["triad"]["max_gbps"]
    reference_ms = rows[0]["ms"]
    for r in rows:
        for key, kind in OPTIMIZER_KEYS.items():
            assert isinstance(r[key], kind), (key, r[key])
        assert r["params"] == "many_small" and r["tensors"] == 300
        assert 300 * 2000 <= r["numel"] < 300 * 6000
        step_bytes = (SGD_BYTES if r["backend"] == "sgd_fused" else AMP_BYTES) * r["numel"]
        assert r["gbps"] * 1e9 == pytest.approx(step_bytes / (r["ms"] * 1e-3), rel=1e-9)
        assert r["floor_ms"] * 1e-3 == pytest.approx(step_bytes / triad_bytes_per_s, rel=1e-9)
        assert r["triad_fraction"] == pytest.approx(r["floor_ms"] / r["ms"], rel=1e-9)
        assert r["speedup_vs_reference"] == pytest.approx(reference_ms / r["ms"], rel=1e-9)
        check_quartiles(r)
    assert rows[0]["speedup_vs_reference"] == 1.0


def test_optimizer_step_times_the_schedules_steps_against_their_floors(optimizer_run):
    stdout, result, _ = optimizer_run
    rows = result["optimizer_step_schedules"]
    names = result["config"]["backends"]
    floors = {"gradient_full": 52, "gradient_between": 20, "trigger_norms": 4}  # B per fp32 parameter (docstring)
    assert [(r["step"], r["backend"]) for r in rows] == [(step, name) for step in floors for name in names]
    triad_bytes_per_s = result["triad"]["gbps"] * 1e9
    for r in rows:
        for key, kind in OPTIMIZER_KEYS.items():
            assert isinstance(r[key], kind), (key, r[key])
        step_bytes = floors[r["step"]] * r["numel"]
        assert r["bytes_per_step"] == step_bytes
        assert r["floor_ms"] * 1e-3 == pytest.approx(step_bytes / triad_bytes_per_s, rel=1e-9)
        check_quartiles(r)
    by_step = {(r["step"], r["backend"]): r for r in rows}
    for name in names:
        if name != "reference":  # fused and foreach: as many dispatched ops for 300 tensors as for a few
            assert by_step["trigger_norms", name]["ops_per_step"] < 30
    assert "x floor" in stdout and "gradient_between" in stdout


def test_optimizer_step_counts_one_step(optimizer_run):
    """The counts are of exactly one step: compared with counts taken here on lists of other lengths."""
    _, result, _ = optimizer_run
    rows = {r["backend"]: r for r in result["optimizer_step"]}
    assert rows["reference"]["syncs_per_step"] == 300  # one .item() per tensor, as the original code
    ops_7, ops_14 = ops_of_one_step("reference", 7)[0], ops_of_one_step("reference", 14)[0]
    per_tensor = (ops_14 - ops_7) // 7
    assert per_tensor > 1 and rows["reference"]["ops_per_step"] == ops_7 + per_tensor * (300 - 7)
    for name in result["config"]["backends"]:
        if name != "reference":  # fused and foreach backends: no sync, as many ops for 300 tensors as for 7
            assert (rows[name]["ops_per_step"], rows[name]["syncs_per_step"]) == ops_of_one_step(name, 7)
    assert rows["sgd_fused"]["syncs_per_step"] == 0 and rows["sgd_fused"]["ops_per_step"] < 10


def test_optimizer_step_prints_machine_then_table_and_plots(optimizer_run):
    stdout, result, png = optimizer_run
    lines = stdout.splitlines()
    assert lines[0].startswith("machine: ") and result["machine"]["cpu"] in lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("set "))
    for column in ("tensors", "params", "backend", "ms", "GB/s", "of triad", "ops/step", "syncs/step", "vs reference"):
        assert column in lines[header]
    assert set(lines[header + 1]) == {"-"}
    table = lines[header + 2:header + 2 + len(result["optimizer_step"])]
    for line, row in zip(table, result["optimizer_step"]):
        cells = line.split()
        assert cells[0] == "many_small" and cells[3] == row["backend"]
        assert cells[-2] == str(row["syncs_per_step"]) and cells[-3] == str(row["ops_per_step"])
    assert "GB/s" in stdout and "triad bandwidth" in stdout
    check_png(png)


def test_train_step_rows(tmp_path):
    stdout = run_main(["--sections", "train_step", "--models", "digits_cnn", "--backends", "reference,foreach",
                       "--rounds", "1", "--min-run-time", "0.01", "--json", str(tmp_path / "t.json"),
                       "--plot", str(tmp_path / "t.png")])
    result = json.loads((tmp_path / "t.json").read_text())
    assert "optimizer_step" not in result and result["train_step_fastest_backend"] == "foreach"
    rows = result["train_step"]
    schedules = ["amp-k4-erm", "amp-k4-reuse", "amp-k4-gradient", "amp-adaptive-erm", "amp-adaptive-gradient"]
    assert [(r["mode"], r["backend"], r["step"]) for r in rows] == [
        ("erm", "sgd_fused", "cycle"), ("amp", "reference", "cycle"), ("amp", "foreach", "cycle")] + [
        (mode, "foreach", step) for mode in schedules for step in ("cycle", "full", "between")]
    erm_ms = rows[0]["ms"]
    for r in rows:
        for key, kind in TRAIN_KEYS.items():
            assert isinstance(r[key], kind), (key, r[key])
        assert (r["model"], r["batch"], r["input"]) == ("digits_cnn", 64, [1, 8, 8])
        assert r["ratio_vs_erm"] == pytest.approx(r["ms"] / erm_ms, rel=1e-9) and math.isfinite(r["ms"])
        assert r["steps_per_sample"] == (4 if r["step"] == "cycle" else 1)
        check_quartiles(r)
    assert rows[0]["ratio_vs_erm"] == 1.0
    assert "x ERM" in stdout and stdout.count("digits_cnn  ") == len(rows)
    check_png(tmp_path / "t.png")


def test_fastest_backend_is_measured_on_the_largest_set():
    parser = cli.build_parser()
    config = cli.resolve_config(parser.parse_args([]), parser)
    config.backends = ["reference", "foreach", "cpu"]  # the choice reads only the names and the rows
    rows = [{"params": "small", "numel": 10, "backend": "foreach", "ms": 1.0},
            {"params": "small", "numel": 10, "backend": "cpu", "ms": 2.0},
            {"params": "big", "numel": 1000, "backend": "reference", "ms": 1.0},
            {"params": "big", "numel": 1000, "backend": "foreach", "ms": 9.0},
            {"params": "big", "numel": 1000, "backend": "cpu", "ms": 5.0},
            {"params": "big", "numel": 1000, "backend": "sgd_fused", "ms": 0.5}]
    assert cli.pick_fastest(config, rows)[0] == "cpu"
    config.backends = ["reference"]
    assert cli.pick_fastest(config, rows)[0] == "reference"


def test_quick_drops_the_big_sets_and_says_so():
    parser = cli.build_parser()
    config = cli.resolve_config(parser.parse_args(["--quick"]), parser)
    assert config.sets == ["resnet18", "many_small"] and config.skipped_sets == ["resnet50", "vit_b_16"]
    assert config.rounds == cli.QUICK_TIMING[0] < cli.FULL_TIMING[0]
    full = cli.resolve_config(parser.parse_args([]), parser)
    assert full.sets == ["resnet18", "resnet50", "vit_b_16", "many_small"] and full.skipped_sets == []
    explicit = cli.resolve_config(parser.parse_args(["--quick", "--sets", "vit_b_16"]), parser)
    assert explicit.sets == ["vit_b_16"] and explicit.skipped_sets == []


@pytest.mark.parametrize("argv, message", [
    (["--backends", "nope"], "argument --backends: 'nope' is unknown; allowed with --device cpu: reference, foreach"),
    (["--backends", "reference,cuda"], "argument --backends: 'cuda' is not available ("),
    (["--backends", "foreach,foreach"], "argument --backends: 'foreach,foreach' names something twice"),
    (["--device", "cuda"], "argument --device: 'cuda' needs a CUDA device"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--sections", "optimizer_step,plots"], "argument --sections: 'plots' is unknown; allowed: optimizer_step, "
                                             "train_step"),
    (["--sets", "resnet19"], "argument --sets: 'resnet19' is unknown; allowed: resnet18, resnet50, vit_b_16, "
                             "many_small"),
    (["--models", "vgg"], "argument --models: 'vgg' is unknown; allowed: resnet18_32, digits_cnn"),
    (["--rounds", "0"], "argument --rounds: must be an int >= 1, got 0"),
    (["--min-run-time", "0"], "argument --min-run-time: must be a number of seconds > 0, got 0.0"),
    (["--threads", "0"], "argument --threads: must be an int >= 1, got 0"),
])
def test_bad_flags_exit_with_the_message(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the --device cuda case on any machine
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_triton_on_cpu_is_not_benchmarked(monkeypatch, capsys):
    """Under TRITON_INTERPRET=1 triton runs on CPU tensors, in its interpreter: never a default, never allowed."""
    monkeypatch.setattr(backends, "available_backends",
                        lambda device_type=None: ["reference", "foreach", "triton"])
    monkeypatch.setattr(backends, "unavailable_reason", lambda name: None)
    assert cli.benchmark_backends("cpu") == ["reference", "foreach"]
    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        cli.resolve_config(parser.parse_args(["--backends", "triton"]), parser)
    assert ("argument --backends: 'triton' is not available (on CPU tensors it runs in Triton's interpreter"
            in capsys.readouterr().err)


def test_host_section_times_every_backend_and_triton_up_to_its_launches(tmp_path):
    """On CPU tensors Triton runs only in its interpreter, so its rows are timed with the launches stubbed out
    (a real launch on CPU tensors without the interpreter raises): every op of every backend, the target beside
    the triton rows."""
    stdout = run_main(["--sections", "host", "--host-sets", "small_1000", "--rounds", "1", "--min-run-time", "0.01",
                       "--json", str(tmp_path / "h.json")])
    rows = json.loads((tmp_path / "h.json").read_text())["host"]
    names = host.host_backends("cpu")
    assert "triton" in names or importlib.util.find_spec("triton") is None
    assert [(r["backend"], r["op"]) for r in rows] == [(b, op) for b in names for op in host.OPS]
    for r in rows:
        assert r["tensors"] == 1000 and r["call_us"] > 0 and r["op_us"] > 0 and r["samples"] >= 1
        assert r["op_us_per_tensor"] == pytest.approx(r["op_us"] / 1000)
        if r["backend"] == "triton":
            assert r["launches_stubbed"]
            assert r["target_us"] == pytest.approx(host.TARGET_US + 1000 * host.TARGET_US_PER_TENSOR)
            assert r["meets_target"] == (r["op_us"] <= r["target_us"])
        else:
            assert not r["launches_stubbed"] and r["target_us"] is None
    assert "host: host time per op call" in stdout and "target us" in stdout
    if "triton" in names:
        assert "triton (no launch)" in stdout


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_step_loop_baseline_is_the_same_sam(adaptive):
    """The per-parameter loop the sam_step section times against computes what amp_fused.SAM computes."""
    from bench import sam_step

    shapes = [torch.Size([7, 3]), torch.Size([11]), torch.Size([2, 3, 4])]
    grads = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    loop, fused = (sam_step.SAMStep(kind, shapes, grads, adaptive, "cpu") for kind in (sam_step.LOOP, "foreach"))
    params = [list(step.optimizer.params if kind == sam_step.LOOP else step.optimizer.param_groups[0]["params"])
              for kind, step in ((sam_step.LOOP, loop), ("foreach", fused))]
    start = [p.clone() for p in params[0]]
    loop.optimizer.first_step()
    fused.optimizer.first_step()
    for a, b in zip(*params):
        torch.testing.assert_close(a, b)
    assert max((a - s).abs().max().item() for a, s in zip(params[0], start)) > 1e-3
    loop.optimizer.second_step()
    fused.optimizer.second_step()
    for a, b in zip(*params):
        torch.testing.assert_close(a, b)


def test_sam_step_section_rows(tmp_path):
    stdout = run_main(["--sections", "sam_step", "--sets", "many_small", "--backends", "foreach", "--rounds", "1",
                       "--min-run-time", "0.01", "--json", str(tmp_path / "s.json")])
    rows = json.loads((tmp_path / "s.json").read_text())["sam_step"]
    assert [(r["mode"], r["kind"]) for r in rows] == [("sam", "loop"), ("sam", "foreach"), ("asam", "loop"),
                                                      ("asam", "foreach")]
    for r in rows:
        assert r["tensors"] == 300 and r["ms"] > 0 and r["ops_per_step"] > 0
        if r["kind"] == "loop":
            assert r["speedup_vs_loop"] == 1.0 and r["ops_per_step"] > 4 * 300  # per-parameter ops
            assert r["syncs_per_step"] == 0
        else:
            assert r["ops_per_step"] < 100  # multi-tensor ops: independent of the 300 tensors
            assert r["syncs_per_step"] == 1  # foreach on CPU tensors reads "all kept?" on the host, where it is free
    assert "sam_step: optimizer-side SAM/ASAM step" in stdout
