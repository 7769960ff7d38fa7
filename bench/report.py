"""Writes results.json, report.md and the PNG plots."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .implementations import IMPLS
from .optimizers import SPECS
from .workloads import WORKLOADS

PLOT_IMPLS = [impl for impl in IMPLS if impl != "roofline"]


@dataclass(frozen=True)
class Target:
    """A goal checked against one row of a run on ``device``: fastopt-fused's
    fraction of the copy bandwidth (``versus`` None), or its speedup over the
    ``versus`` implementation's median."""
    workload: str
    dtype: str
    option_set: str
    at_least: float
    versus: str | None = None
    device: str = "cuda"
    # Compare with ``versus`` on another option set (8-bit state vs float32 state).
    versus_option_set: str | None = None

    def text(self) -> str:
        other = f" {SPECS[self.versus_option_set].label}" if self.versus_option_set else ""
        if self.versus is None:
            goal = f"≥ {self.at_least:.1f} × copy bandwidth"
        elif self.versus == "roofline":
            goal = f"≥ {self.at_least:.1f} × the roofline's GB/s"
        else:
            goal = f"≥ {self.at_least:.1f}× {self.versus}{other}"
        return f"{SPECS[self.option_set].label} {self.dtype} {self.workload}: fastopt-fused {goal}"


TARGETS = (
    # CUDA backend: GPT-2 XL Adam near the copy bandwidth and at least torch's
    # fused Adam; many small tensors well ahead of it
    Target("gpt2-xl", "fp32", "adam", 0.9),
    Target("gpt2-xl", "fp32", "adam", 1.0, "torch-fused"),
    Target("4000x1000", "fp32", "adam", 1.3, "torch-fused"),
    # the training pipeline (GradScaler + clipping + Adam) on the CPU
    Target("gpt2-124m", "fp32", "adam-pipeline", 1.4, "torch-fused", device="cpu"),
    # 8-bit state: fewer bytes, a faster step than float32 state, near the
    # bandwidth of the roofline, far ahead of bitsandbytes on the CPU
    Target("gpt2-124m", "fp32", "adam-8bit", 1.4, "fastopt-fused", device="cpu", versus_option_set="adam"),
    Target("gpt2-124m", "fp32", "adam-8bit", 0.9, "roofline", device="cpu"),
    Target("gpt2-124m", "fp32", "adamw-8bit", 20.0, "pypi", device="cpu"),
    Target("gpt2-xl", "fp32", "adamw-8bit", 1.0, "pypi"),
)
TARGET_TITLES = {"cuda": "Targets (CUDA backend)", "cpu": "Targets (CPU)"}


def write_json(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")


def _ordered(values, order):
    seen = list(dict.fromkeys(values))
    return [v for v in order if v in seen] + [v for v in seen if v not in order]


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _summary_cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "–"
    speedup = _fmt(row["speedup_vs_torch"], ".2f", "×")
    if row["speedup_vs_torch"] is None and row.get("speedup_vs_pypi") is not None:
        speedup = _fmt(row["speedup_vs_pypi"], ".2f", "× PyPI")  # torch.optim has no such optimizer
    return f"{speedup} / {_fmt(_pct(row['roofline_fraction']), '.0f', '%')}"


def _pct(fraction: float | None) -> float | None:
    return None if fraction is None else 100 * fraction


def _table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> list[str]:
    align = align or ["l"] + ["r"] * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def _targets(rows: list[dict[str, Any]], device: str) -> list[list[str]]:
    """One table row per target of ``device``: the goal, the value measured in this run, met or not."""
    index = {(r["workload"], r["dtype"], r["option_set"], r["impl"]): r for r in rows}
    body = []
    for t in (t for t in TARGETS if t.device == device):
        ours = index.get((t.workload, t.dtype, t.option_set, "fastopt-fused"))
        if t.versus is None:
            value = ours and ours["copy_bw_fraction"]
            shown = _fmt(value, ".2f", f" × copy BW ({ours['gbps']:.0f} GB/s)" if ours else "")
        elif t.versus == "roofline":
            value = ours and ours["roofline_fraction"]
            shown = _fmt(value, ".2f", f" × roofline ({ours['gbps']:.0f} GB/s)" if ours else "")
        else:
            other = index.get((t.workload, t.dtype, t.versus_option_set or t.option_set, t.versus))
            value = other["median_ms"] / ours["median_ms"] if ours and other else None
            shown = _fmt(value, ".2f", f"× ({_ms(ours['median_ms'])} vs {_ms(other['median_ms'])} ms)"
                         if value is not None else "")
        verdict = "not measured" if value is None else ("**met**" if value >= t.at_least else "**not met**")
        body.append([t.text(), shown, verdict])
    return body


def write_markdown(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]], plots: dict[str, str],
                   plot_note: str | None) -> None:
    lines: list[str] = []
    m = meta
    cuda = str(m["device"]).startswith("cuda")
    device_line = (f"- **Device**: {m['device']} — {m.get('device_name', '?')} (host CPU: {m['cpu_name']}, "
                   f"**threads**: {m['threads']})" if cuda else
                   f"- **Device**: {m['device']} — {m['cpu_name']} (fastopt cpu_capability: "
                   f"{m['fastopt_cpu_capability']}), **threads**: {m['threads']}")
    copy = m.get("copy_bandwidth")
    copy_line = ("- **Copy bandwidth** (reference): not measured" if not copy else
                 f"- **Copy bandwidth** (reference): **{copy['gbps']:.1f} GB/s** median "
                 f"(best {copy['gbps_best']:.1f}) — `dst.copy_(src)` of {copy['buffer_bytes'] / 2**20:.0f} MiB, "
                 f"{copy['bytes_per_copy'] / 2**20:.0f} MiB moved per copy (read + write), "
                 f"median {copy['median_ms']:.3g} ms of {copy['repeats']}; "
                 + " / ".join(f"{when} of the run: {copy[when]['gbps']:.1f}"
                              for when in ("start", "end") if copy.get(when)) + " GB/s")
    lines += [
        "# fastopt optimizer-step benchmark",
        "",
        device_line,
        f"- **torch** {m['torch_version']} · **fastopt** {m['fastopt_version']} · **date** {m['date']} · "
        f"**runtime** {m['runtime_s']:.0f} s",
        f"- **Command**: `{m['command_line']}`",
        f"- Machine load (1-min load average, {m.get('logical_cpus')} logical CPUs): "
        f"{_fmt(m['load_average_1m']['start'], '.2f')} at start, {_fmt(m['load_average_1m']['end'], '.2f')} at end"
        " (a load above the benchmark's own threads means other processes shared the cores)",
        f"- Last-level cache: {m['llc_bytes'] / 2**20:.0f} MiB ({m['llc_source']})",
        copy_line,
        "",
        "One optimizer step (`opt.step()`, grads already set) per row.  **% roofline** = roofline "
        "time / step time, where the roofline is `torch.ops.fastopt.roofline_bound_` (the op `roofline_` on tensors bound once, like the optimizers): the same streams "
        "(param r/w, every state slot r/w, grad read) through fastopt's "
        f"{'CUDA' if cuda else 'CPU'} driver with one add per "
        "stream, measured on the same tensors in the same run.  **speedup** = fastest torch.optim "
        "implementation's median (for-loop, foreach or fused) / this median; **vs PyPI** (and “× PyPI” in the "
        "summary, for optimizers torch.optim lacks) = the published package's median (impl `pypi`) / this median.  GB/s counts "
        "numel × itemsize × (2·(1+K) + 1) bytes per step, K = state tensors per param (Adam fp32: "
        "28 B per param; with 8-bit state each state tensor counts 1 + 4/256 bytes per element, code and "
        "block scale, and % roofline is the ratio of GB/s, as the roofline kernel moves float32 state).  "
        "LAMB and LARS read their streams twice (a reduction phase: params, grads and LAMB's two slots read "
        "once more, for the per-param norms), counted in their GB/s; their roofline adds a read-only "
        "pass over the same streams (`grad_sq_norm`).  **% copy BW** = that GB/s / the copy bandwidth above.",
        "",
    ]
    device_type = "cuda" if cuda else "cpu"
    lines += [f"## {TARGET_TITLES[device_type]}", "",
              "Measured in this run; a target whose workload or dtype was not run reads "
              "\"not measured\".", ""]
    lines += _table(["target", "measured", "verdict"], _targets(rows, device_type), ["l", "r", "l"]) + [""]
    if m.get("state_memory"):
        lines += ["## State memory: fastopt.Adam with `state_dtype=torch.bfloat16` and `torch.uint8`", "",
                  "Bytes of the state (exp_avg, exp_avg_sq; with 8-bit state their codes and block scales) "
                  "of float32 params after one step, with float32 state (the default), bfloat16 state "
                  "(target: exactly half) and 8-bit state (tensors under 4096 elements stay float32; "
                  "target: at most 0.26).", ""]
        body = [[s["workload"], f"{s['fp32_state_bytes'] / 2**20:.1f}", f"{s['bf16_state_bytes'] / 2**20:.1f}",
                 f"{s['ratio']:.4f}", "**met**" if s["ratio"] == 0.5 else "**not met**",
                 f"{s['uint8_state_bytes'] / 2**20:.1f}", f"{s['uint8_ratio']:.4f}",
                 "**met**" if s["uint8_ratio"] <= 0.26 else
                 "– (every tensor under min_8bit_size)" if s["uint8_ratio"] == 1.0 else "**not met**"]
                for s in m["state_memory"]]
        lines += _table(["workload", "fp32 state MiB", "bf16 state MiB", "bf16 ratio", "exactly half",
                         "8-bit state MiB", "8-bit ratio", "<= 0.26"], body,
                        ["l", "r", "r", "r", "l", "r", "r", "l"]) + [""]
    workloads = _ordered([r["workload"] for r in rows], list(WORKLOADS))
    dtypes = _ordered([r["dtype"] for r in rows], ["fp32", "bf16", "fp16", "fp64"])
    labels = _ordered([r["label"] for r in rows], [])
    impls = _ordered([r["impl"] for r in rows], list(IMPLS))
    index = {(r["workload"], r["dtype"], r["label"], r["impl"]): r for r in rows}
    big = [w for w in workloads if not WORKLOADS[w].overhead]

    if big and "fastopt-fused" in impls:
        lines += ["## Summary: fastopt fused — speedup over torch.optim's best / % of roofline", ""]
        for dtype in dtypes:
            lines += [f"**{dtype}**", ""]
            body = [[label] + [_summary_cell(index.get((w, dtype, label, "fastopt-fused"))) for w in big]
                    for label in labels]
            lines += _table(["optimizer"] + big, body) + [""]

    if any(WORKLOADS[w].overhead for w in workloads):
        w = next(w for w in workloads if WORKLOADS[w].overhead)
        lines += [f"## Per-step fixed overhead: {WORKLOADS[w].description}", "",
                  "Median µs per step; cache-resident by design, so this is the Python + dispatch "
                  "cost a step pays regardless of size.", ""]
        for dtype in dtypes:
            present = [i for i in impls if any((w, dtype, l, i) in index for l in labels)]
            if not present:
                continue
            lines += [f"**{dtype}**", ""]
            body = [[label] + [_fmt(index[(w, dtype, label, i)]["median_ms"] * 1e3, ".0f")
                               if (w, dtype, label, i) in index else "–" for i in present]
                    for label in labels]
            lines += _table(["optimizer"] + present, body) + [""]

    for w in big:
        wl = WORKLOADS[w]
        lines += [f"## {w}: {wl.description} ({wl.num_tensors} tensors, {wl.numel:,} elements)", ""]
        copies: dict[tuple[str, str], int] = {}
        for r in rows:
            if r["workload"] == w:
                key = (r["dtype"], r["label"])
                copies[key] = max(copies.get(key, 1), r["copies"])
        rotated = {k: c for k, c in copies.items() if c > 1}
        factor = m.get("rotation_factor", "?")
        if rotated:
            lines += [f"Cache: footprint under {factor}× LLC, so steps rotate over independent copies "
                      "(param sets) — " + ", ".join(f"{d} {l}: {c}" for (d, l), c in rotated.items())
                      + ".", ""]
        else:
            lines += [f"Cache: footprint ≥ {factor}× LLC in every case, one param set (no rotation).", ""]
        if w in plots:
            lines += [f"![{w}]({plots[w]})", ""]
        for dtype in dtypes:
            body = []
            for label in labels:
                for impl in impls:
                    r = index.get((w, dtype, label, impl))
                    if r is None:
                        continue
                    name = f"**{impl}**" if impl == "fastopt-fused" else impl
                    body.append([
                        label, name,
                        f"{_ms(r['median_ms'])} ({_ms(r['min_ms'])}–{_ms(r['max_ms'])})",
                        f"{r['gbps']:.1f}",
                        _fmt(_pct(r["roofline_fraction"]), ".0f", "%"),
                        _fmt(_pct(r.get("copy_bw_fraction")), ".0f", "%"),
                        _fmt(r["speedup_vs_torch"], ".2f", "×"),
                        _fmt(r.get("speedup_vs_pypi"), ".2f", "×"),
                        _fmt(r["peak_extra_mib"], ".1f"),
                        str(r["repeats"]),
                    ])
            if body:
                lines += [f"**{dtype}**", ""]
                lines += _table(["optimizer", "impl", "median ms (min–max)", "GB/s", "% roofline",
                                 "% copy BW", "speedup vs torch best", "vs PyPI", "extra MiB", "n"], body,
                                ["l", "l", "r", "r", "r", "r", "r", "r", "r", "r"]) + [""]

    lines += ["## Notes", ""]
    if plot_note:
        lines.append(f"- {plot_note}")
    lines += [f"- {note}" for note in m.get("notes", [])]
    lines += [f"- {text}" for text in m.get("method", [])]
    path.write_text("\n".join(lines) + "\n")


def write_plots(out: Path, rows: list[dict[str, Any]]) -> tuple[dict[str, str], str | None]:
    """One PNG per workload: speedup over torch's best (log scale) and % of
    roofline, per optimizer option set and implementation, one column per dtype."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as error:
        return {}, f"Plots skipped: matplotlib is not importable ({type(error).__name__}); `pip install matplotlib`."
    plots: dict[str, str] = {}
    workloads = _ordered([r["workload"] for r in rows], list(WORKLOADS))
    for w in workloads:
        if WORKLOADS[w].overhead:
            continue
        sub = [r for r in rows if r["workload"] == w]
        dtypes = _ordered([r["dtype"] for r in sub], ["fp32", "bf16", "fp16", "fp64"])
        labels = _ordered([r["label"] for r in sub], [])
        impls = [i for i in PLOT_IMPLS if any(r["impl"] == i for r in sub)]
        if not impls:
            continue
        index = {(r["dtype"], r["label"], r["impl"]): r for r in sub}
        fig, axes = plt.subplots(2, len(dtypes), figsize=(1.6 + 1.3 * len(labels) * len(dtypes), 7.5),
                                 squeeze=False)
        width = 0.8 / len(impls)
        for col, dtype in enumerate(dtypes):
            for row_i, (key, title, scale) in enumerate((
                    ("speedup_vs_torch", "speedup over torch.optim's best", 1.0),
                    ("roofline_fraction", "% of roofline", 100.0))):
                ax = axes[row_i][col]
                for k, impl in enumerate(impls):
                    xs, ys = [], []
                    for j, label in enumerate(labels):
                        r = index.get((dtype, label, impl))
                        if r is not None and r[key] is not None:
                            xs.append(j + (k - (len(impls) - 1) / 2) * width)
                            ys.append(r[key] * scale)
                    ax.bar(xs, ys, width, label=impl)
                ax.axhline(scale, color="black", linewidth=0.8)
                if key == "speedup_vs_torch":
                    ax.set_yscale("log")
                ax.set_title(f"{w} {dtype}: {title}", fontsize=9)
                ax.set_xticks(range(len(labels)))
                ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
                ax.grid(axis="y", alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        name = f"{w}.png"
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        plots[w] = name
    return plots, None
