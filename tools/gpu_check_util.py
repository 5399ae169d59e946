#!/usr/bin/env python3
"""Helpers of ``tools/gpu_check.sh`` that are easier in Python than in bash.

``env [--dry-run] --json PATH``
    What the machine has: GPU (nvidia-smi and torch), driver, CUDA runtime, torch, Triton, torchvision,
    Python, nvcc, compute-sanitizer. Exit 1 when torch does not import or (not ``--dry-run``) torch sees
    no CUDA device.
``backends [--dry-run] --json PATH``
    ``import amp_fused`` and the backends it offers for CUDA tensors, which must include ``cuda`` and
    ``triton`` (``--dry-run``: for CPU tensors, which should include ``cpu``); prints
    ``amp_fused.backends.unavailable_reason(name)`` for a missing one. Exit 1 when one is missing, except that
    the dry run accepts a missing ``cpu`` while ``foreach`` is there: its tools then run on ``foreach`` in
    its place (:func:`dry_backend`), and the result line says so.
``collected LOG``
    The number of tests a ``pytest --collect-only -q`` log says it collected.
``summary --steps TSV --work DIR --out DIR --mode MODE --budget S --total S``
    Writes ``summary.json``: the steps (name, status, seconds, timeout, result) and what the steps left in
    the work folder (env, ptxas report, backends) and in the output folder (stress, bandwidth).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What the dry run's tools run on in place of the cpu backend when that one is unavailable (a checkout whose
# C++ CPU kernels lag its op table): the cpu kernels that amp_fused._C has, foreach for the other ops, so the
# harness still runs end to end on CPU tensors (foreach alone is less exact than the fused kernels: it rounds
# Δ of fp16/bf16 tensors to their dtype, which the stress checks' bounds do not allow).
DRY_STAND_IN = "foreach"


class DryStandIn:
    """A backend object (``amp_fused.functional`` takes one in place of a name): each op on the cpu backend
    where ``amp_fused._C`` has its CPU kernel, else on ``foreach``."""
    NAME = "cpu+foreach"
    DEVICE_TYPES = ("cpu",)
    NATIVE_CHECKS = False

    def __init__(self):
        import torch
        from amp_fused import _extension, backends

        _extension.cpu_error  # noqa: B018 - loads amp_fused._C (its ops, with the kernels it has)
        self._backends = {"cpu": backends.get("cpu"), DRY_STAND_IN: backends.get(DRY_STAND_IN)}
        self.ops = {}
        for op in backends.OPS:
            kernel = op not in _extension.OPS or (
                hasattr(torch.ops.amp_fused, op)
                and torch._C._dispatch_has_kernel_for_dispatch_key(f"amp_fused::{op}", "CPU"))
            self.ops[op] = "cpu" if kernel else DRY_STAND_IN

    def unavailable_reason(self):
        return None

    def __getattr__(self, op):
        ops = self.__dict__.get("ops", {})
        if op in ops:
            return getattr(self._backends[ops[op]], op)
        raise AttributeError(op)

    def __str__(self):
        return self.NAME

    def __format__(self, spec):
        return format(str(self), spec)

    def describe(self) -> str:
        on = {name: [op for op, b in self.ops.items() if b == name] for name in self._backends}
        return (f"{self.NAME}: cpu for {', '.join(on['cpu']) or 'no op'}; "
                f"{DRY_STAND_IN} for {', '.join(on[DRY_STAND_IN]) or 'no op'}")


def dry_backend(exact: bool = True):
    """The backend the dry run tests in place of a GPU one: ``("cpu", None)`` when the cpu backend is
    available, else (``exact``: a :class:`DryStandIn`, else the name ``DRY_STAND_IN``; and why)."""
    import amp_fused
    from amp_fused import backends

    if "cpu" in amp_fused.available_backends("cpu"):
        return "cpu", None
    why = f"the cpu backend is unavailable ({backends.unavailable_reason('cpu')})"
    if not exact:
        return DRY_STAND_IN, f"{why}; {DRY_STAND_IN} stands in for it"
    try:
        stand_in = DryStandIn()
    except Exception as exc:  # noqa: BLE001 - no amp_fused._C at all: foreach alone
        return DRY_STAND_IN, f"{why}; {DRY_STAND_IN} stands in for it (amp_fused._C: {exc!r})"
    return stand_in, f"{why}; {stand_in.describe()} stand in for it"


def _run(cmd: list[str], timeout: float = 15) -> str | None:
    """stdout + stderr of a command, or None when it is missing or fails to start."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout + done.stderr).strip()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _tool(name: str) -> str | None:
    """A CUDA tool on PATH or under CUDA_HOME."""
    found = shutil.which(name)
    if found:
        return found
    home = os.environ.get("CUDA_HOME")
    for candidate in ([os.path.join(home, "bin", name), os.path.join(home, name, name)] if home else []):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def gather_env() -> dict:
    info: dict = {"python": platform.python_version(), "python_executable": sys.executable,
                  "machine": platform.machine(), "cpus": os.cpu_count(), "os": platform.platform(),
                  "triton": _version("triton"), "torchvision": _version("torchvision"),
                  "CUDA_HOME": os.environ.get("CUDA_HOME")}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda_runtime"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if info["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            info["device_count"] = torch.cuda.device_count()
            info["gpu_torch"] = props.name
            info["capability"] = f"{props.major}.{props.minor}"
            info["sms"] = props.multi_processor_count
            info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            info["l2_mib"] = round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None
        from torch.utils import cpp_extension

        info["torch_CUDA_HOME"] = cpp_extension.CUDA_HOME
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        info["torch_error"] = repr(exc)
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    info["nvidia_smi"] = smi
    if smi and "," in smi:
        name, driver, memory = (s.strip() for s in smi.splitlines()[0].split(",")[:3])
        info.update(gpu=name, driver=driver, gpu_memory=memory)
        plain = _run(["nvidia-smi"]) or ""
        m = re.search(r"CUDA Version:\s*([\d.]+)", plain)
        info["driver_cuda"] = m.group(1) if m else None
    nvcc = _tool("nvcc")
    info["nvcc_path"] = nvcc
    if nvcc:
        out = _run([nvcc, "--version"]) or ""
        m = re.search(r"release ([\d.]+), (V[\d.]+)", out)
        info["nvcc"] = f"{m.group(1)} ({m.group(2)})" if m else out.splitlines()[-1:] or None
    sanitizer = _tool("compute-sanitizer")
    info["compute_sanitizer_path"] = sanitizer
    if sanitizer:
        out = _run([sanitizer, "--version"]) or ""
        m = re.search(r"Version ([\d.]+)", out)
        info["compute_sanitizer"] = m.group(1) if m else (out.splitlines()[-1] if out else None)
    return info


def env_line(info: dict) -> str:
    gpu = info.get("gpu") or info.get("gpu_torch")
    if gpu:
        gpu = (f"{gpu} (sm_{info.get('capability', '?').replace('.', '')}, {info.get('sms', '?')} SMs, "
               f"{info.get('gpu_memory_gib', '?')} GiB, L2 {info.get('l2_mib', '?')} MiB), driver "
               f"{info.get('driver', '?')} (CUDA {info.get('driver_cuda', '?')})")
    else:
        gpu = "no GPU"
    return (f"{gpu}; torch {info.get('torch', 'MISSING')} (CUDA runtime {info.get('torch_cuda_runtime')}), "
            f"triton {info.get('triton')}, python {info.get('python')}, nvcc {info.get('nvcc')}, "
            f"compute-sanitizer {info.get('compute_sanitizer')}")


def cmd_env(args) -> int:
    info = gather_env()
    with open(args.json, "w") as f:
        json.dump(info, f, indent=1)
    for key, value in info.items():
        print(f"{key:>24}: {value}")
    print("RESULT: " + env_line(info))
    if "torch" not in info:
        print("torch does not import with this python; set PYTHON= to one that has it")
        return 1
    if not args.dry_run and not info.get("cuda_available"):
        print("torch sees no CUDA device")
        return 1
    return 0


def cmd_backends(args) -> int:
    device_type, needed = ("cpu", ("cpu",)) if args.dry_run else ("cuda", ("cuda", "triton"))
    result: dict = {"device_type": device_type, "needed": list(needed)}
    try:
        import amp_fused
        from amp_fused import _extension, backends

        result["available"] = amp_fused.available_backends(device_type)
        result["reasons"] = {name: backends.unavailable_reason(name) for name in backends.BACKEND_NAMES}
        result["cuda_extension_error"] = _extension.cuda_error
        chunk = getattr(sys.modules.get("amp_fused._C_cuda"), "CHUNK_SIZE", None)
        result["cuda_chunk_size"] = chunk
    except Exception as exc:  # noqa: BLE001
        result["error"] = repr(exc)
        result["available"] = []
    missing = [name for name in needed if name not in result["available"]]
    result["missing"] = missing
    stand_in = args.dry_run and missing == ["cpu"] and DRY_STAND_IN in result["available"]
    if stand_in:
        result["dry_run_stand_in"] = DRY_STAND_IN
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"amp_fused.available_backends({device_type!r}) = {result['available']}")
    if result.get("cuda_chunk_size"):
        print(f"amp_fused._C_cuda.CHUNK_SIZE = {result['cuda_chunk_size']}")
    elif result.get("cuda_extension_error"):
        print(f"amp_fused._C_cuda: {result['cuda_extension_error']}")
    if "error" in result:
        print(f"import amp_fused failed: {result['error']}")
    for name in missing:
        print(f"MISSING {name}: amp_fused.backends.unavailable_reason({name!r}) = "
              f"{result.get('reasons', {}).get(name)!r}")
    status = "missing " + ", ".join(missing) if missing else "has " + ", ".join(needed)
    if stand_in:
        status += f"; the dry run's tools use {DRY_STAND_IN} in its place"
    print(f"RESULT: backends for {device_type} {result['available']} ({status})")
    return 1 if missing and not stand_in else 0


def collected(text: str) -> int | None:
    """Tests collected, from pytest's last line ("554/2017 tests collected (1463 deselected) in 6.4s",
    "12 tests collected in 0.5s", "no tests collected ...")."""
    for line in reversed(text.splitlines()):
        m = re.search(r"(\d+)(?:/\d+)? tests? collected", line)
        if m:
            return int(m.group(1))
        if "no tests collected" in line or "no tests ran" in line:
            return 0
    return None


def cmd_collected(args) -> int:
    with open(args.log, errors="replace") as f:
        n = collected(f.read())
    print(n if n is not None else "?")
    return 0 if n else 1


def _load(path: Path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def cmd_summary(args) -> int:
    steps = []
    with open(args.steps) as f:
        for line in f:
            name, status, seconds, timeout, message = (line.rstrip("\n").split("\t", 4) + [""] * 5)[:5]
            steps.append({"step": name, "status": status, "seconds": float(seconds or 0),
                          "timeout_s": float(timeout or 0), "result": message})
    work, out = Path(args.work), Path(args.out)
    stress, bandwidth = _load(out / "stress.json"), _load(out / "bandwidth.json")
    summary = {
        "mode": args.mode, "budget_s": args.budget, "total_s": args.total,
        "overall": "FAIL" if any(s["status"] == "FAIL" for s in steps) else "PASS",
        "steps": steps,
        "env": _load(work / "env.json"),
        "ptxas": _load(work / "ptxas.json"),
        "backends": _load(work / "backends.json"),
        "stress": {k: stress.get(k) for k in ("mode", "passed", "failed", "not_run")} if stress else None,
        "bandwidth": bandwidth.get("headline") if bandwidth else None,
        "files": sorted(p.name for p in out.iterdir() if p.is_file()),
    }
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="helpers of tools/gpu_check.sh")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("env", "backends"):
        p = sub.add_parser(name)
        p.add_argument("--dry-run", action="store_true")
        p.add_argument("--json", required=True)
    p = sub.add_parser("collected")
    p.add_argument("log")
    p = sub.add_parser("summary")
    for option in ("--steps", "--work", "--out", "--mode"):
        p.add_argument(option, required=True)
    p.add_argument("--budget", type=float, default=0)
    p.add_argument("--total", type=float, default=0)
    args = parser.parse_args(argv)
    return {"env": cmd_env, "backends": cmd_backends, "collected": cmd_collected, "summary": cmd_summary}[
        args.command](args)


if __name__ == "__main__":
    sys.exit(main())
