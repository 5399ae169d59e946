"""tools/gpu_check.sh and its helpers, on this machine (no GPU): the dry run passes and prints its table, the
ptxas report parser finds spills, the bandwidth arithmetic is right, and the stress harness catches a broken
backend (so a PASS on a GPU means something)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"
SCRIPT = TOOLS / "gpu_check.sh"


def load(name: str):
    """A module of tools/ by file (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ptxas_report = load("ptxas_report")
gpu_bandwidth = load("gpu_bandwidth")
gpu_stress = load("gpu_stress")
gpu_check_util = load("gpu_check_util")
REUSE_OPS = ("norms", "restore_orthogonal_", "add_orthogonal_")


def base_backend():
    """What the dry run tests: the cpu backend, or its stand-in where a checkout's CPU kernels lag."""
    return gpu_check_util.dry_backend()[0]


def run_check(*args, python=sys.executable, timeout=240, out=None):
    env = dict(os.environ, PYTHON=python)
    env.pop("OUT", None)
    cmd = ["bash", str(SCRIPT), *args] + (["--out", str(out)] if out else [])
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# -- the dry run -------------------------------------------------------------------------------------------------
DRY_STEPS = "env,build,stress,sanitizer,bandwidth"  # the pytest collection is left to .ci/run's full dry run


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    done = run_check("--dry-run", "--steps", DRY_STEPS, out=out)
    return done, out


def test_dry_run_passes_and_prints_the_table_last(dry_run):
    done, out = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    lines = done.stdout.rstrip().splitlines()
    header = max(i for i, line in enumerate(lines) if "gpu_check summary (dry-run)" in line)
    table = lines[header + 2:-1]
    assert [line.split()[0] for line in table] == ["env", "build", "cuda-tests", "triton-gpu-tests", "stress",
                                                   "sanitizer", "bandwidth"]
    status = {line.split()[0]: line.split()[1] for line in table}
    assert status["env"] == status["build"] == status["stress"] == status["bandwidth"] == "PASS"
    assert status["sanitizer"] == "SKIP" and status["cuda-tests"] == "SKIP"  # not selected
    assert lines[-1].startswith("overall: PASS")
    assert "58/58 checks passed" in done.stdout  # the stress cases on the cpu backend (or its stand-in)
    assert "no spills" in done.stdout  # the build step's ptxas parser sample


def test_dry_run_output_files_fit_the_runner(dry_run):
    _, out = dry_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 1 <= len(files) <= 8
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) and len(p.relative_to(out).parts) <= 3 for p in files)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"] == "PASS" and summary["mode"] == "dry-run"
    assert {s["step"]: s["status"] for s in summary["steps"]}["stress"] == "PASS"
    stress = json.loads((out / "stress.json").read_text())
    assert stress["failed"] == 0 and stress["passed"] == len(stress["results"]) > 0
    assert any("2147487745" in line for line in stress["would_run_on_gpu"])  # says what it runs on a GPU
    ran = {r["op"].split()[0] for r in stress["results"]}
    assert set(REUSE_OPS) <= ran  # the gradient-reuse ops ran in the stress cases
    cases = {r["case"].split()[0] for r in stress["results"] if r["op"].startswith("restore_orthogonal_")}
    assert cases == {"overlap", "unaligned", "many", "huge"}
    bandwidth = json.loads((out / "bandwidth.json").read_text())
    expected = {"foreach", "sgd_fused"} | ({"cpu"} if base_backend() == "cpu" else set())
    assert {r["backend"] for r in bandwidth["rows"]} == expected
    assert all("gpu_ms" in r for r in bandwidth["rows"]), [r for r in bandwidth["rows"] if "gpu_ms" not in r]
    reuse = {(r["set"], r["dtype"], r["backend"], r["op"]) for r in bandwidth["rows"] if r["op"] in REUSE_OPS}
    assert reuse == {(s, d, b, op) for s in ("one_256M", "vit_b_16") for d in ("fp32", "bf16")
                     for b in expected - {"sgd_fused"} for op in REUSE_OPS}


def test_a_failing_step_fails_the_run_and_still_prints_the_table(tmp_path):
    done = run_check("--dry-run", "--steps", "env", python=str(tmp_path / "no-such-python"), out=tmp_path, timeout=60)
    assert done.returncode == 1
    lines = done.stdout.rstrip().splitlines()
    assert lines[-1].startswith("overall: FAIL")
    assert any(re.match(r"env\s+FAIL\s", line) for line in lines)


def test_unknown_argument_is_refused():
    assert run_check("--frobnicate", timeout=30).returncode == 2


# -- ptxas report --------------------------------------------------------------------------------------------------
# Written from ptxas's documented -v output: "Compiling entry function", "Function properties", the stack/spill
# line and the "Used N registers" line; the second kernel in the older format (no barriers).
NO_SPILLS = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z10sum_kernelPKfPdl' for 'sm_90'
ptxas info    : Function properties for _Z10sum_kernelPKfPdl
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 38 registers, used 1 barriers, 136 bytes smem
ptxas info    : Compile time = 12.5 ms
ptxas info    : Compiling entry function '_Z12apply_kernelPfPKfS1_f' for 'sm_90'
ptxas info    : Function properties for _Z12apply_kernelPfPKfS1_f
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, 392 bytes cmem[0]
"""
WITH_SPILLS = NO_SPILLS + """\
ptxas info    : Compiling entry function '_Z10big_kernelPd' for 'sm_90'
ptxas info    : Function properties for _Z10big_kernelPd
    24 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 392 bytes cmem[0]
ptxas info    : Function properties for _Z6helperv
    8 bytes stack frame, 0 bytes spill stores, 4 bytes spill loads
"""


def test_ptxas_parser_reads_registers_and_no_spills():
    records = ptxas_report.parse(NO_SPILLS)
    assert [(r["name"], r["kind"], r["arch"], r["registers"]) for r in records] == [
        ("_Z10sum_kernelPKfPdl", "entry", "sm_90", 38), ("_Z12apply_kernelPfPKfS1_f", "entry", "sm_90", 40)]
    assert records[0]["barriers"] == 1 and records[0]["smem_bytes"] == 136
    assert records[1]["barriers"] is None and records[1]["spill_store_bytes"] == 0
    assert ptxas_report.spills(records) == []
    summary = ptxas_report.summarize(records, with_demangled=False)
    status, line = ptxas_report.verdict(summary)
    assert status == 0 and summary["max_registers"] == 40 and "no spills" in line


def test_ptxas_parser_lists_every_spill():
    records = ptxas_report.parse(WITH_SPILLS)
    bad = ptxas_report.spills(records)
    assert [(r["name"], r["spill_store_bytes"], r["spill_load_bytes"]) for r in bad] == [
        ("_Z10big_kernelPd", 16, 8), ("_Z6helperv", 0, 4)]
    assert bad[1]["kind"] == "function"  # a device function compiled on its own, not a kernel
    summary = ptxas_report.summarize(records, with_demangled=False)
    status, line = ptxas_report.verdict(summary)
    assert status == 1 and summary["kernels"] == 3 and summary["max_registers"] == 255
    assert "2 spill" in line and "_Z10big_kernelPd" in line


def test_ptxas_report_command(tmp_path):
    for text, expected in ((NO_SPILLS, 0), (WITH_SPILLS, 1), ("nvcc: nothing compiled\n", 2)):
        log = tmp_path / "build.log"
        log.write_text("[1/3] nvcc ...\n" + text)
        done = subprocess.run([sys.executable, str(TOOLS / "ptxas_report.py"), str(log), "--json",
                               str(tmp_path / "p.json")], capture_output=True, text=True, timeout=60)
        assert done.returncode == expected, done.stdout + done.stderr
        assert json.loads((tmp_path / "p.json").read_text())["verdict"] == done.stdout.splitlines()[-1]


# -- bandwidth arithmetic ------------------------------------------------------------------------------------------
def test_bytes_moved_per_op():
    assert gpu_bandwidth.bytes_moved("copy", 1000, 4) == 8000  # read + write
    assert gpu_bandwidth.bytes_moved("perturb_", 1000, 4) == 20000  # g twice, θ; θ+Δ, backup
    assert gpu_bandwidth.bytes_moved("restore_sgd_", 1000, 2) == 10000  # backup, grad, momentum; param, momentum
    assert gpu_bandwidth.bytes_moved("sgd_step", 2**28, 4) == 5 * 2**30
    assert gpu_bandwidth.bytes_moved("norms", 1000, 4) == 4000  # reads only
    assert gpu_bandwidth.bytes_moved("restore_orthogonal_", 1000, 4) == 32000  # 12 for the sums + 20 to apply
    assert gpu_bandwidth.bytes_moved("add_orthogonal_", 1000, 4) == 20000  # g, v twice; g


def test_rates_and_fractions():
    assert gpu_bandwidth.gbps(4_000_000_000, 1e-3) == pytest.approx(4000.0)
    assert gpu_bandwidth.fraction(3440.0, 4300.0) == pytest.approx(0.8)
    assert gpu_bandwidth.fmt_rate(3910.0) == "3.91TB/s" and gpu_bandwidth.fmt_rate(71.5) == "71.5GB/s"


def test_rotations_keep_the_data_out_of_l2():
    l2 = 60 * 2**20
    assert gpu_bandwidth.rotations(4 * 2**30, l2) == 1  # the 256M set: far larger than L2
    assert gpu_bandwidth.rotations(20 * 2**20, l2) == 8  # 300 small tensors: 4x L2 needs 12 sets, capped at 8
    assert gpu_bandwidth.rotations(100 * 2**20, l2) == 3
    assert gpu_bandwidth.rotations(1000, None) == 1  # CPU


def test_targets_and_headline():
    ceiling = 4000.0
    rows = []
    for backend, rate in (("cuda", 3400.0), ("triton", 2600.0)):
        for op in ("perturb_", "restore_sgd_"):
            nbytes = gpu_bandwidth.bytes_moved(op, 2**28, 4)
            rows.append({"set": "one_256M", "dtype": "fp32", "backend": backend, "op": op, "bytes": nbytes,
                         "gpu_ms": nbytes / (rate * 1e9) * 1e3, "gbps": rate, "fraction": rate / ceiling,
                         "host_us": 20.0})
            rows.append({"set": "vit_b_16", "dtype": "fp32", "backend": backend, "op": op, "bytes": 1,
                         "gpu_ms": 0.1, "gbps": 1.0, "fraction": 0.5, "host_us": 50.0 if backend == "cuda" else 150.0})
    report = {"rows": rows, "backends": ["cuda", "triton"], "ceiling": {"gbps": ceiling}, "not_measured": []}
    report["targets"] = gpu_bandwidth.evaluate_targets(report)
    ok = {t["target"]: t["ok"] for t in report["targets"]}
    assert ok["cuda fp32 perturb_ on one_256M ≥ 80% of copy"] is True  # 85 %
    assert ok["triton fp32 perturb_ on one_256M ≥ 70% of copy"] is False  # 65 %
    assert ok["cuda fp32 restore_sgd_ on vit_b_16: host < GPU"] is True  # 50 µs < 100 µs
    assert ok["triton fp32 restore_sgd_ on vit_b_16: host < GPU"] is False  # 150 µs > 100 µs
    line = gpu_bandwidth.headline(report)
    assert "cuda 3.40TB/s 85%" in line and "triton 2.60TB/s 65%" in line and "targets met 4/8" in line
    assert "orthogonal" not in line  # the gradient-reuse ops were not measured
    for op in REUSE_OPS:  # their rows get targets of their own, and a part of the headline
        nbytes = gpu_bandwidth.bytes_moved(op, 2**28, 4)
        report["rows"].append({"set": "one_256M", "dtype": "fp32", "backend": "cuda", "op": op, "bytes": nbytes,
                               "gpu_ms": nbytes / 3000e9 * 1e3, "gbps": 3000.0, "fraction": 0.75, "host_us": 20.0})
    report["targets"] = gpu_bandwidth.evaluate_targets(report)
    ok = {t["target"]: t["ok"] for t in report["targets"]}
    assert ok["cuda fp32 restore_orthogonal_ on one_256M ≥ 80% of copy"] is False  # 75 %
    line = gpu_bandwidth.headline(report)
    assert line.startswith("one_256M fp32 perturb_+restore_sgd_: cuda 3.40TB/s 85%")  # as before
    assert "norms+restore_orthogonal_+add_orthogonal_: cuda 3.00TB/s 75%" in line and "targets met 4/11" in line


def test_restore_orthogonal_timing_sees_the_same_delta_every_call():
    shapes = [(100,), (37,)]
    sets = [gpu_bandwidth.make_inputs(shapes, torch.float32, "cpu", torch.Generator().manual_seed(0), reuse=True)]
    fn = gpu_bandwidth.reuse_fns("foreach", sets)["restore_orthogonal_"]
    theta = [b.clone() for b in sets[0]["backups"]]
    outs = []
    for i in range(3):
        fn.prepare(i)
        assert all(not torch.equal(p, t) for p, t in zip(sets[0]["params"], theta))  # Δ ≠ 0 before each call
        fn(i)
        assert all(torch.equal(p, t) for p, t in zip(sets[0]["params"], theta))
        outs.append([o.clone() for o in sets[0]["orthogonals"]])
    assert all(torch.equal(a, b) for a, b in zip(outs[1], outs[2]))  # stationary


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="needs torchvision")
def test_vit_b_16_shapes_written_out_match_torchvision():
    shapes, source = gpu_bandwidth.vit_b_16_shapes()
    assert source.startswith("torchvision")
    assert shapes == gpu_bandwidth.VIT_B_16_SHAPES
    assert len(shapes) == 152 and sum(math.prod(s) for s in shapes) == 86_567_656


# -- the stress harness catches what it is for -------------------------------------------------------------------
class Broken:
    """The cpu backend with one fault planted in one op (what a GPU kernel bug would look like)."""
    NAME = "broken"
    DEVICE_TYPES = ("cpu",)
    NATIVE_CHECKS = False

    def __init__(self, fault):
        from amp_fused import backends

        base = base_backend()
        self.inner = backends.get(base) if isinstance(base, str) else base
        self.fault = fault

    def __getattr__(self, op):  # the ops without a fault planted here
        if op in ("inner", "fault"):
            raise AttributeError(op)
        return getattr(self.inner, op)

    def norms(self, tensors):
        norms = self.inner.norms(tensors)
        if self.fault == "norms_total_off":
            norms[-1] *= 1.001
        return norms

    def restore_orthogonal_(self, params, backups, grads, orthogonals, per_tensor):
        self.inner.restore_orthogonal_(params, backups, grads, orthogonals, per_tensor)
        if self.fault == "orthogonal_last_chunk_unwritten":
            big = max(orthogonals, key=torch.Tensor.numel)
            big.view(-1)[-5:] = float("nan")  # the poison a chunk the kernel skipped keeps

    def add_orthogonal_(self, grads, orthogonals, alpha, per_tensor):
        self.inner.add_orthogonal_(grads, orthogonals, alpha, per_tensor)
        if self.fault == "non_finite_v_reaches_g":
            for g, v in zip(grads, orthogonals):
                if v.numel() and not bool(torch.isfinite(v).all()):
                    g.add_(v)

    def unavailable_reason(self):
        return None

    def perturb_(self, params, grads, backups, *args):
        norms = self.inner.perturb_(params, grads, backups, *args)
        if self.fault == "skip_last_chunk_of_backup":
            big = max(backups, key=torch.Tensor.numel)
            big.view(-1)[-5:] = float("nan")  # a chunk the kernel never wrote keeps its poison
        if self.fault == "scale_off":  # Δ 0.1 % too long in one tensor
            params[0].sub_(backups[0]).mul_(1.001).add_(backups[0])
        return norms

    def restore_(self, params, backups):
        self.inner.restore_(params, backups)

    def restore_sgd_(self, params, backups, grads, momentum, *args):
        self.inner.restore_sgd_(params, backups, grads, momentum, *args)
        if self.fault == "write_past_view":
            for p in params:
                if p._base is not None and p.storage_offset() + p.numel() < p._base.numel():
                    p._base.view(-1)[p.storage_offset() + p.numel()] = 0.0  # one element past the end
        if self.fault == "momentum_int32_wrap":  # the last elements of the largest tensor wrong
            big = max(momentum, key=torch.Tensor.numel)
            big.view(-1)[-3:] += 1.0

    def perturbation(self, params, backups):
        return self.inner.perturbation(params, backups)


def failed_ops(results):
    """The ops that failed, in the order they ran."""
    return [r["op"] for r in results if not r["ok"]]


def small_lists(seed=0):
    shapes, dtypes = gpu_stress.many_shapes(gpu_stress.dry_sizes(1 << 16), torch.Generator().manual_seed(seed))
    return gpu_stress.make_lists(shapes, dtypes, "cpu", torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fault, ops", [
    ("skip_last_chunk_of_backup", ["perturb_ first, per-tensor"]),
    ("scale_off", ["perturb_ first, per-tensor", "perturb_ later, global", "perturb_ later, per-tensor"]),
    ("momentum_int32_wrap", ["restore_sgd_ first step, nesterov, wd",
                             "restore_sgd_ momentum, dampening, wd, maximize"]),
    ("norms_total_off", ["norms"]),
    ("orthogonal_last_chunk_unwritten", ["restore_orthogonal_ per-tensor, Δ = 0 in some",
                                         "restore_orthogonal_ global"]),
    ("non_finite_v_reaches_g", ["add_orthogonal_ per-tensor, v = 0 / NaN in some"]),
])
def test_stress_harness_catches_a_broken_backend(fault, ops, one_thread):
    case = gpu_stress.Case("many", Broken(fault), small_lists(), torch.float64, torch.Generator().manual_seed(1),
                           "cpu")
    case.sequence()
    failed = failed_ops(case.results)
    # the op with the fault fails first (later ones may fail too: they start from its wrong output)
    assert failed[:1] == ops[:1] and set(ops) <= set(failed), failed


def test_stress_harness_catches_a_write_past_a_view(one_thread):
    sizes = gpu_stress.dry_sizes(1 << 16)
    lists = gpu_stress.make_view_lists(sizes.unaligned, [torch.float32] * len(sizes.unaligned), "cpu",
                                       torch.Generator().manual_seed(0))
    case = gpu_stress.Case("unaligned", Broken("write_past_view"), lists, torch.float64,
                           torch.Generator().manual_seed(1), "cpu")
    case.sequence()
    bad = [r for r in case.results if not r["ok"]]
    assert bad and all(any(c["check"] == "elements around views untouched" and not c["ok"] for c in r["checks"])
                       for r in bad)


def test_stress_harness_passes_the_cpu_backend(one_thread):
    case = gpu_stress.Case("many", base_backend(), small_lists(), torch.float64, torch.Generator().manual_seed(1),
                           "cpu")
    case.sequence()
    assert failed_ops(case.results) == [] and len(case.results) == 11


def test_overlap_case_needs_the_error_before_any_write(one_thread):
    results = gpu_stress.case_overlap(base_backend(), "cpu", torch.Generator().manual_seed(0))
    assert len(results) == 17 and all(r["ok"] for r in results)
    assert sum(r["op"].startswith(("restore_orthogonal_", "add_orthogonal_")) for r in results) == 8
    assert any(r["op"].startswith("norms of overlapping") for r in results)  # reads only: no error


# -- small helpers -------------------------------------------------------------------------------------------------
def test_collected_count_from_pytest_output():
    assert gpu_check_util.collected("a\nb\n554/2017 tests collected (1463 deselected) in 6.43s\n") == 554
    assert gpu_check_util.collected("12 tests collected in 0.5s") == 12
    assert gpu_check_util.collected("no tests collected in 0.1s") == 0
    assert gpu_check_util.collected("ERROR: file not found") is None
