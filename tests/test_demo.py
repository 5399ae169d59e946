"""The demo (python -m bench.demo, make demo): a thin front over the quality study (bench/quality.py, tested in
tests/test_quality.py). Here: that it lives in bench/ beside the library, not in the installed package; that it runs
the quick plan and prints the table and draws both plots from it; that --full picks the full plan; its flag errors."""
import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

from bench import demo, quality  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TINY = quality.Plan("quick", tasks=(
    quality.Task("spiral/tiny", "spiral", "mlp", quality.SplitSizes(test=200, train=40, val=40), epochs=2,
                 batch_size=16, lr=0.1),
), epsilons=(0.01, 0.1), inner_lrs=(1.0,), grid_seeds=2, final_seeds=2, cost_rounds=1, cost_cycles=1)


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


def test_the_demo_is_the_quick_study_table_and_both_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(quality, "QUICK", TINY)
    argv = ["--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--jobs", "1", "--no-progress",
            "--runs", "erm,amp-per_tensor,amp-k2-reuse"]
    record = demo.main(argv)
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("run "))
    assert [line.split()[0] for line in lines[header + 2:header + 5]] == ["erm", "amp-per_tensor", "amp-k2-reuse"]
    assert "quality study (quick)" in out and "selected per_tensor: epsilon" in out
    figures = [Path(f) for f in record["figures"]]
    assert [f.name for f in figures] == ["quality_quick_sensitivity.png", "quality_quick_cost.png"]
    assert all(f.parent == tmp_path / "out" and f.read_bytes()[:8] == PNG_MAGIC for f in figures)
    on_disk = json.loads((tmp_path / "out" / "quality_quick.json").read_text())
    assert on_disk["schema"] == quality.SCHEMA and on_disk["counts"]["trained"] > 0
    # A second call finds every run in the cache.
    again = demo.main(argv)
    assert again["counts"]["trained"] == 0 and again["counts"]["timed"] == 0
    assert again["tasks"] == record["tasks"]


def test_full_runs_the_full_plan(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(quality, "run_and_report", lambda args, plan, json_path: seen.update(plan=plan) or {})
    demo.main(["--full", "--out", str(tmp_path)])
    assert seen["plan"] is quality.FULL
    demo.main(["--out", str(tmp_path), "--tasks", "spiral/mlp"])
    assert seen["plan"] == replace(quality.QUICK, tasks=(quality.QUICK.tasks[-1],))


@pytest.mark.parametrize("argv, fragments", [
    (["--runs", "erm,sam"], ["argument --runs: 'sam' is not a run kind", "amp-k<K>-<erm|reuse|gradient>"]),
    (["--runs", "amp-k1-erm"], ["argument --runs: 'amp-k1-erm' is not a run kind", "K >= 2"]),
    (["--runs", "erm,erm"], ["argument --runs: lists a run kind twice"]),
    (["--runs", ","], ["argument --runs: needs at least one run kind"]),
    (["--tasks", "cifar/resnet"], ["argument --tasks: 'cifar/resnet' is not a task of the quick plan",
                                   "digits/cnn"]),
    (["--jobs", "0"], ["argument --jobs: must be an int >= 1, got 0"]),
])
def test_bad_flags_name_the_flag_and_the_allowed_values(argv, fragments, capsys, monkeypatch):
    def no_study(*args):
        raise AssertionError(f"{argv} was accepted")

    monkeypatch.setattr(quality, "run_and_report", no_study)
    with pytest.raises(SystemExit) as exit_info:
        demo.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err
