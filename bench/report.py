"""Plain-text tables and PNG bar charts of the benchmark's JSON rows."""
from __future__ import annotations

from pathlib import Path

from .optimizer_step import (AMP_BYTES_MOVED_PER_PARAM, AMP_BYTES_PER_PARAM, SGD_BYTES_PER_PARAM, SGD_FUSED,
                             TRIAD_BYTES_MOVED, TRIAD_BYTES_PER_ELEMENT)


# -- tables ----------------------------------------------------------------------------------------------------
def format_table(columns: list[tuple[str, str]], rows: list[list[str]], rule: bool = True) -> str:
    """``columns``: (header, "<" or ">") pairs; every cell is already a string. Each column is as wide as its
    widest cell, columns are two spaces apart, and ``rule`` draws a line of dashes under the header (the
    benchmark's tables have one, the demo's do not)."""
    widths = [max([len(header)] + [len(row[i]) for row in rows]) for i, (header, _) in enumerate(columns)]

    def line(cells):
        return "  ".join(f"{cell:{align}{width}}" for cell, (_, align), width in zip(cells, columns, widths)).rstrip()

    header = line([h for h, _ in columns])
    return "\n".join([header] + (["-" * len(header)] if rule else []) + [line(row) for row in rows])


def fmt_ms(ms: float) -> str:
    return f"{ms:.0f}" if ms >= 1000 else f"{ms:.1f}" if ms >= 100 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def machine_text(machine: dict) -> str:
    m = machine
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    load = (f"; load average at start {', '.join(f'{x:.2f}' for x in m['load_average'])} (1, 5, 15 min)"
            if m.get("load_average") else "")
    return "\n".join([
        f"machine: {m['cpu']}, {m['physical_cores']} cores ({m['usable_cpus']} usable), {m['memory_gib']} GiB, "
        f"CPU capability {m['cpu_capability']}{gpu}",
        f"software: torch {m['torch']} ({m['torch_threads']} threads), torchvision {m['torchvision']}, "
        f"triton {m['triton']}, Python {m['python']}, {m['os']}",
        f"device: {m['device']}; date: {m['date']}{load}",
    ])


def optimizer_step_text(rows: list[dict], triad: dict) -> str:
    amp_share = TRIAD_BYTES_MOVED / TRIAD_BYTES_PER_ELEMENT * AMP_BYTES_PER_PARAM / AMP_BYTES_MOVED_PER_PARAM
    sgd_share = TRIAD_BYTES_MOVED / TRIAD_BYTES_PER_ELEMENT
    head = "\n".join([
        "optimizer_step: one AMP step (perturb_ + restore_sgd_) per backend; sgd_fused = torch.optim.SGD(fused=True) "
        "alone",
        f"triad bandwidth {triad['gbps']:.1f} GB/s (median of {triad['measurements']}, range {triad['min_gbps']:.1f}-"
        f"{triad['max_gbps']:.1f}); floor: {AMP_BYTES_PER_PARAM} B/param (AMP step), {SGD_BYTES_PER_PARAM} B/param "
        "(SGD step) at that bandwidth",
        f"(a write-only stream also reads its lines: the triad moves {TRIAD_BYTES_MOVED} B per "
        f"{TRIAD_BYTES_PER_ELEMENT} counted, an AMP step {AMP_BYTES_MOVED_PER_PARAM} per {AMP_BYTES_PER_PARAM}, an SGD "
        "step what it counts;",
        f" at equal DRAM throughput an AMP step shows {amp_share:.0%} of the triad, an SGD step {sgd_share:.0%}; "
        "a set that fits in the caches can show more)",
    ])
    columns = [("set", "<"), ("tensors", ">"), ("params", ">"), ("backend", "<"), ("ms", ">"), ("IQR ms", ">"),
               ("floor ms", ">"), ("GB/s", ">"), ("of triad", ">"), ("ops/step", ">"), ("syncs/step", ">"),
               ("vs reference", ">")]
    cells = [[r["params"], str(r["tensors"]), f"{r['numel']:,}", r["backend"], fmt_ms(r["ms"]), fmt_ms(r["iqr_ms"]),
              fmt_ms(r["floor_ms"]), f"{r['gbps']:.1f}", f"{r['triad_fraction']:.0%}", str(r["ops_per_step"]),
              str(r["syncs_per_step"]),
              "-" if r["speedup_vs_reference"] is None else f"{r['speedup_vs_reference']:.2f}x"] for r in rows]
    return head + "\n" + format_table(columns, cells)


def schedule_steps_text(rows: list[dict]) -> str:
    """The schedules' optimizer-side steps, each against its own floor (bench.optimizer_step.SCHEDULE_STEPS)."""
    head = ("optimizer_step, the schedules' steps: gradient_full = perturb_ + restore_orthogonal_ (52 B/param), "
            "gradient_between = add_orthogonal_ (20 B/param),\ntrigger_norms = norms of g (4 B/param); floors at the "
            "same triad bandwidth; their base step (torch.optim.SGD) is not included")
    columns = [("set", "<"), ("step", "<"), ("backend", "<"), ("ms", ">"), ("IQR ms", ">"), ("floor ms", ">"),
               ("x floor", ">"), ("GB/s", ">"), ("ops/step", ">"), ("syncs/step", ">")]
    cells = [[r["params"], r["step"], r["backend"], fmt_ms(r["ms"]), fmt_ms(r["iqr_ms"]), fmt_ms(r["floor_ms"]),
              f"{r['ms'] / r['floor_ms']:.2f}", f"{r['gbps']:.1f}", str(r["ops_per_step"]), str(r["syncs_per_step"])]
             for r in rows]
    return head + "\n" + format_table(columns, cells)


def train_step_text(rows: list[dict], fastest_note: str) -> str:
    head = ("train_step: forward + backward + optimizer, ms per step (cycle: mean over a period of 4 steps; full, "
            "between: that kind of step alone; adaptive: forced to one full step in 4);\n"
            f"ERM = torch.optim.SGD(fused=True); AMP's fastest backend here: {fastest_note}")
    columns = [("model", "<"), ("input", "<"), ("batch", ">"), ("mode", "<"), ("step", "<"), ("backend", "<"),
               ("ms/step", ">"), ("IQR ms", ">"), ("x ERM", ">")]
    cells = [[r["model"], "x".join(map(str, r["input"])), str(r["batch"]), r["mode"], r["step"], r["backend"],
              fmt_ms(r["ms"]), fmt_ms(r["iqr_ms"]), f"{r['ratio_vs_erm']:.2f}"] for r in rows]
    return head + "\n" + format_table(columns, cells)


# -- charts ----------------------------------------------------------------------------------------------------
def _grouped_bars(ax, groups: list[str], rows_by_group: dict[str, list[dict]], bar_key, colors: dict[str, str]):
    """One cluster of bars per group (median, whiskers at the quartiles); returns each cluster's x extent."""
    extents = {}
    width = 0.8 / max(len(v) for v in rows_by_group.values())
    for g, group in enumerate(groups):
        rows = rows_by_group[group]
        left = g - width * len(rows) / 2
        for i, r in enumerate(rows):
            x = left + width * (i + 0.5)
            key = bar_key(r)
            ax.bar(x, r["ms"], width * 0.9, color=colors[key], label=key,
                   yerr=[[r["ms"] - r["q1_ms"]], [r["q3_ms"] - r["ms"]]], capsize=2, ecolor="0.3")
            ax.text(x, r["q3_ms"] * 1.04, fmt_ms(r["ms"]), ha="center", va="bottom", fontsize=7,
                    bbox=dict(facecolor="white", edgecolor="none", pad=0.3, alpha=0.8))
        extents[group] = (left, left + width * len(rows))
    ax.set_xticks(range(len(groups)), groups)
    ax.set_yscale("log")
    return extents


def _dedup_legend(ax, **kwargs):
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, **kwargs)


def plot(path: Path, optimizer_rows: list[dict] | None, train_rows: list[dict] | None, title: str) -> None:
    """One bar chart per section that ran, stacked in one PNG (matplotlib's Agg canvas: no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sections = [s for s in (("optimizer_step", optimizer_rows), ("train_step", train_rows)) if s[1]]
    fig = Figure(figsize=(11, 4.8 * len(sections)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(sections), 1, squeeze=False)[:, 0]
    palette = [f"C{i}" for i in range(10)]
    for ax, (name, rows) in zip(axes, sections):
        groups = list(dict.fromkeys(r["params" if name == "optimizer_step" else "model"] for r in rows))
        if name == "optimizer_step":
            by_group = {g: [r for r in rows if r["params"] == g] for g in groups}
            keys = list(dict.fromkeys(r["backend"] for r in rows))
            extents = _grouped_bars(ax, groups, by_group, lambda r: r["backend"],
                                    dict(zip(keys, palette)))
            for g in groups:
                lo, hi = extents[g]
                for r, style, label in (
                        (next(r for r in by_group[g] if r["backend"] != SGD_FUSED), "--",
                         f"floor: {AMP_BYTES_PER_PARAM} B/param at triad bandwidth (AMP step)"),
                        (next(r for r in by_group[g] if r["backend"] == SGD_FUSED), ":",
                         f"floor: {SGD_BYTES_PER_PARAM} B/param (SGD step)")):
                    ax.hlines(r["floor_ms"], lo, hi, colors="k", linestyles=style, label=label)
            amp_share = (TRIAD_BYTES_MOVED / TRIAD_BYTES_PER_ELEMENT * AMP_BYTES_PER_PARAM
                         / AMP_BYTES_MOVED_PER_PARAM)
            ax.text(1.01, 0.0, "A floor is the bytes the step must\nmove at the triad's bandwidth. The\n"
                    f"triad moves {TRIAD_BYTES_MOVED} B per {TRIAD_BYTES_PER_ELEMENT} counted (write-\n"
                    f"allocate), so a step streaming at its\nDRAM speed shows {1 / amp_share:.2f}x the AMP floor\n"
                    f"and {TRIAD_BYTES_PER_ELEMENT / TRIAD_BYTES_MOVED:.2f}x the SGD floor; a set that\n"
                    "fits in the caches can go lower.", transform=ax.transAxes, fontsize=8, va="bottom")
            ax.set_title("optimizer_step: one optimizer-side AMP step per backend (no forward/backward)")
            ax.set_ylabel("ms per step (log)")
        else:
            by_group = {g: [r for r in rows if r["model"] == g] for g in groups}
            by_group = {g: [r for r in rs if r.get("step", "cycle") == "cycle"] for g, rs in by_group.items()}
            keys = list(dict.fromkeys(f"{r['mode']} ({r['backend']})" for rs in by_group.values() for r in rs))
            extents = _grouped_bars(ax, groups, by_group, lambda r: f"{r['mode']} ({r['backend']})",
                                    dict(zip(keys, palette)))
            for g in groups:
                lo, hi = extents[g]
                erm = next(r["ms"] for r in by_group[g] if r["mode"] == "erm")
                ax.hlines(erm, lo, hi, colors="k", linestyles=":", label="ERM")
                ax.hlines(2 * erm, lo, hi, colors="k", linestyles="--", label="floor of exact AMP: 2x ERM")
            ax.set_title("train_step: forward + backward + optimizer, per step (mean over a period of 4)")
            ax.set_ylabel("ms per step (log)")
        _dedup_legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(axis="y", which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
