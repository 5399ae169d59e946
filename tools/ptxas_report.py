#!/usr/bin/env python3
"""Reads ptxas's resource report (``nvcc -Xptxas -v``) out of a build log: registers, stack and spills per
kernel. Used by ``tools/gpu_check.sh``; runs anywhere (no torch, no GPU).

ptxas writes, for every function it compiles for an architecture::

    ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'
    ptxas info    : Function properties for _Z6kernelPf
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 40 registers, used 1 barriers, 392 bytes cmem[0]

(older releases leave out "used N barriers"; a non-inlined device function has only the "Function
properties" and stack/spill lines). A spill is register state moved to local memory: slow, and for these
streaming kernels a sign that a kernel variant keeps too much live. ``python3 tools/ptxas_report.py LOG
[--json PATH]`` prints the report and exits 0 when kernels were found and none spills, 1 when one spills,
2 when the log holds no ptxas report at all (the flag was not passed, or nothing was compiled).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys

_ENTRY = re.compile(r"ptxas\s+info\s*:\s*Compiling entry function '([^']+)' for '([^']+)'")
_PROPERTIES = re.compile(r"ptxas\s+info\s*:\s*Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas\s+info\s*:\s*Used (\d+) registers")
_BARRIERS = re.compile(r"used (\d+) barriers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse(text: str) -> list[dict]:
    """One record per (function, architecture) ptxas reported, in the order of the log.

    Each record: ``name`` (mangled), ``arch``, ``kind`` ("entry" for a kernel, "function" for a device
    function compiled on its own), ``registers``, ``barriers``, ``smem_bytes`` (None where not reported),
    ``stack_frame_bytes``, ``spill_store_bytes``, ``spill_load_bytes``.
    """
    records: list[dict] = []
    by_key: dict[tuple[str, str], dict] = {}
    entry: dict | None = None  # the kernel the next "Used N registers" line belongs to
    properties: dict | None = None  # the function the next stack/spill line belongs to
    arch = None

    def record(name: str, kind: str) -> dict:
        key = (name, arch or "?")
        if key not in by_key:
            by_key[key] = {"name": name, "arch": arch or "?", "kind": kind, "registers": None, "barriers": None,
                           "smem_bytes": None, "stack_frame_bytes": None, "spill_store_bytes": None,
                           "spill_load_bytes": None}
            records.append(by_key[key])
        elif kind == "entry":
            by_key[key]["kind"] = "entry"
        return by_key[key]

    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            arch = m.group(2)
            entry = record(m.group(1), "entry")
            properties = None
            continue
        m = _PROPERTIES.search(line)
        if m:
            properties = record(m.group(1), "function")
            continue
        m = _FRAME.search(line)
        if m and properties is not None:
            properties["stack_frame_bytes"], properties["spill_store_bytes"], properties["spill_load_bytes"] = (
                int(g) for g in m.groups())
            properties = None
            continue
        m = _USED.search(line)
        if m and entry is not None:
            entry["registers"] = int(m.group(1))
            barriers, smem = _BARRIERS.search(line), _SMEM.search(line)
            entry["barriers"] = int(barriers.group(1)) if barriers else None
            entry["smem_bytes"] = int(smem.group(1)) if smem else None
            entry = None
    return records


def spills(records: list[dict]) -> list[dict]:
    """The records with spill stores or spill loads."""
    return [r for r in records if (r["spill_store_bytes"] or 0) > 0 or (r["spill_load_bytes"] or 0) > 0]


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled → demangled names through c++filt where it exists (else each name maps to itself)."""
    tool = shutil.which("c++filt")
    if not names or tool is None:
        return {n: n for n in names}
    try:
        out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=30).stdout
        lines = out.splitlines()
        if len(lines) == len(names):
            return dict(zip(names, lines))
    except (OSError, subprocess.SubprocessError):
        pass
    return {n: n for n in names}


def short_name(demangled: str, limit: int = 160) -> str:
    return demangled if len(demangled) <= limit else demangled[:limit - 3] + "..."


def summarize(records: list[dict], with_demangled: bool = True) -> dict:
    """What gpu_check records: counts, spills (listed), registers per kernel."""
    names = demangle(sorted({r["name"] for r in records})) if with_demangled else {}
    kernels = [r for r in records if r["kind"] == "entry"]
    bad = spills(records)
    registers = [r["registers"] for r in kernels if r["registers"] is not None]
    return {
        "kernels": len(kernels),
        "device_functions": len(records) - len(kernels),
        "archs": sorted({r["arch"] for r in records}),
        "max_registers": max(registers) if registers else None,
        "max_stack_frame_bytes": max((r["stack_frame_bytes"] or 0 for r in records), default=None),
        "spilling": [dict(r, demangled=short_name(names.get(r["name"], r["name"]))) for r in bad],
        "per_kernel": [dict(r, demangled=short_name(names.get(r["name"], r["name"]))) for r in kernels],
    }


def verdict(summary: dict) -> tuple[int, str]:
    """(exit status, one line): 0 no spills, 1 spills, 2 no report."""
    if summary["kernels"] == 0:
        return 2, "no ptxas report in the build log (no kernel compiled with -Xptxas -v)"
    head = (f"{summary['kernels']} kernels for {','.join(summary['archs'])}, max {summary['max_registers']} "
            f"registers, max stack {summary['max_stack_frame_bytes']} B")
    if summary["spilling"]:
        listed = "; ".join(f"{r['demangled']} ({r['spill_store_bytes']} B stores, {r['spill_load_bytes']} B loads)"
                           for r in summary["spilling"][:5])
        more = f" and {len(summary['spilling']) - 5} more" if len(summary["spilling"]) > 5 else ""
        return 1, f"{head}; {len(summary['spilling'])} spill: {listed}{more}"
    return 0, f"{head}, no spills"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", help="build log holding nvcc -Xptxas -v output")
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args(argv)
    with open(args.log, errors="replace") as f:
        summary = summarize(parse(f.read()))
    status, line = verdict(summary)
    summary["verdict"] = line
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    for r in summary["spilling"]:
        print(f"SPILL {r['arch']} {r['demangled']}: {r['spill_store_bytes']} B stores, "
              f"{r['spill_load_bytes']} B loads, {r['stack_frame_bytes']} B stack")
    print(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
