"""Command line of ``python -m bench``."""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from . import report, runner, state_memory, system, timing
from .implementations import IMPLS, NEEDS_EXTENSION
from .optimizers import DEFAULT_OPTIMIZERS, SPECS
from .workloads import WORKLOADS

DEFAULT_WORKLOADS = ("overhead", "4000x1000", "lora", "flat", "resnet50", "gpt2-124m", "gpt2-xl")
DEFAULT_DTYPES = ("fp32", "bf16")
DEFAULT_IMPLS = ("roofline", "fastopt-fused", "fastopt-reference", "torch-forloop", "torch-foreach",
                 "torch-fused", "pypi", "deepspeed", "apex")
QUICK = {
    "workloads": ("4000x1000",),
    "optimizers": ("adam", "sgd-momentum"),
    "dtypes": ("fp32",),
    "impls": ("roofline", "fastopt-fused", "torch-fused"),
}
QUICK_POLICY = {"target_s": 0.25, "min_repeats": 5, "max_repeats": 30, "warmup_s": 0.05}


def _list(choices):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(item.strip() for item in text.split(",") if item.strip())
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(choices)}")
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks one optimizer step of fastopt against torch.optim (for-loop, foreach, "
                    "fused), DeepSpeed's CPU optimizers when importable, and the roofline op, with the "
                    "device's copy bandwidth as a reference; writes results.json, report.md and PNG "
                    "plots into --out.  On a GPU, bench/gpu_run.sh runs the CUDA targets' measurements.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory")
    parser.add_argument("--quick", action="store_true",
                        help=f"small subset in seconds: {QUICK['workloads'][0]}, Adam + SGD momentum, fp32, "
                             "fastopt fused vs torch fused vs roofline, short timing (explicit flags win)")
    parser.add_argument("--workloads", type=_list(tuple(WORKLOADS)), default=None,
                        help=f"comma list from {','.join(WORKLOADS)} [default: {','.join(DEFAULT_WORKLOADS)}; "
                             "those for another device are left out, with a note in the report]")
    parser.add_argument("--optimizers", type=_list(tuple(SPECS)), default=None,
                        help=f"comma list from {','.join(SPECS)} [default: {','.join(DEFAULT_OPTIMIZERS)}]")
    parser.add_argument("--dtypes", type=_list(tuple(runner.DTYPES)), default=None,
                        help=f"comma list from {','.join(runner.DTYPES)} [default: {','.join(DEFAULT_DTYPES)}]")
    parser.add_argument("--impls", type=_list(IMPLS), default=None,
                        help=f"comma list from {','.join(IMPLS)} [default: all]")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per measurement [default: enough for ~0.5 s, 3 to 50; "
                             "fastopt-reference at most 3]")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run [default: torch's current setting]")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="device of the tensors (cuda: timed with CUDA events)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-extra-memory measurement step")
    parser.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random params and grads")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    pick = lambda name, default: getattr(args, name) or (QUICK[name] if args.quick else default)  # noqa: E731
    device = torch.device(args.device)
    workloads = pick("workloads", tuple(name for name in DEFAULT_WORKLOADS
                                        if device.type in WORKLOADS[name].devices))
    left_out = [name for name in DEFAULT_WORKLOADS if name not in workloads] if not args.workloads else []
    unrunnable = [name for name in workloads if device.type not in WORKLOADS[name].devices]
    if unrunnable:
        print(f"python -m bench: workload(s) {', '.join(unrunnable)} run on "
              f"{' or '.join(WORKLOADS[unrunnable[0]].devices)} only", file=sys.stderr)
        return 2
    optimizers = pick("optimizers", DEFAULT_OPTIMIZERS)
    dtypes = pick("dtypes", DEFAULT_DTYPES)
    impls = pick("impls", DEFAULT_IMPLS)
    repeats = args.repeats
    if repeats is not None and repeats < 1:
        print("python -m bench: --repeats must be at least 1", file=sys.stderr)
        return 2

    if device.type == "cuda" and not torch.cuda.is_available():
        print("python -m bench: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print("python -m bench: --threads must be at least 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)

    import fastopt

    backends = fastopt.backends()
    needs = [impl for impl in impls if impl in NEEDS_EXTENSION]
    if needs and device.type not in backends["fused_devices"]:
        why = backends["load_error"] or f"it was built without {device.type} kernels"
        print(f"python -m bench: the fastopt extension is not loaded for {device.type} ({why}); "
              f"{', '.join(needs)} need it.  Rebuild fastopt (pip install -e .) or run only "
              f"--impls fastopt-reference,torch-forloop,torch-foreach,torch-fused", file=sys.stderr)
        return 2

    llc_bytes, llc_source = system.last_level_cache(device)
    notes = runner.Notes()
    for name in left_out:
        if device.type not in WORKLOADS[name].devices:
            notes.add(f"workload {name} not run: it runs on {' or '.join(WORKLOADS[name].devices)} only "
                      f"({WORKLOADS[name].description})")
    config = runner.Config(
        workloads=list(workloads), optimizers=list(optimizers), dtypes=list(dtypes), impls=list(impls),
        device=device,
        policy=timing.Policy(repeats=repeats, measure_memory=not args.no_memory,
                             **(QUICK_POLICY if args.quick else {})),
        seed=args.seed,
    )
    load_before = _load_average()
    started = time.perf_counter()
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    copy_start = _copy_bandwidth(device, llc_bytes, config.policy, notes, "start")
    rows = runner.run(config, llc_bytes, notes)
    copy_end = _copy_bandwidth(device, llc_bytes, config.policy, notes, "end")
    copy_bw = _copy_reference(copy_start, copy_end, device)
    state_bytes = state_memory.measure([WORKLOADS[name] for name in workloads], device)
    runner.set_copy_fraction(rows, copy_bw and copy_bw["gbps"])
    runtime = time.perf_counter() - started

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    plots, plot_note = ({}, "Plots skipped (--no-plots).") if args.no_plots else report.write_plots(out, rows)
    meta = {
        "device": str(device),
        "device_name": system.device_name(device),
        "cpu_name": system.cpu_name(),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "fastopt_version": fastopt.__version__,
        "fastopt_cpu_capability": backends["cpu_capability"],
        "fastopt_backends": backends,
        "date": date,
        "command_line": shlex.join(["python", "-m", "bench"] + sys.argv[1:] if argv is None
                                   else ["python", "-m", "bench"] + list(argv)),
        "runtime_s": runtime,
        "load_average_1m": {"start": load_before, "end": _load_average()},
        "logical_cpus": os.cpu_count(),
        "llc_bytes": llc_bytes,
        "llc_source": llc_source,
        "copy_bandwidth": copy_bw,
        "state_memory": state_bytes,
        "rotation_factor": config.rotation_factor,
        "workloads": {name: {"description": WORKLOADS[name].description,
                             "num_tensors": WORKLOADS[name].num_tensors, "numel": WORKLOADS[name].numel}
                      for name in workloads},
        "notes": notes.lines(),
        "method": method_text(config, llc_bytes),
    }
    report.write_json(out / "results.json", meta, rows)
    report.write_markdown(out / "report.md", meta, rows, plots, plot_note)
    print(f"wrote {out / 'results.json'}, {out / 'report.md'}"
          + (f" and {len(plots)} plots" if plots else "") + f" in {runtime:.0f} s", file=sys.stderr)
    return 0


def _copy_bandwidth(device: torch.device, llc_bytes: int, policy: timing.Policy, notes: runner.Notes,
                    when: str) -> dict | None:
    print(f"python -m bench: copy bandwidth of {device.type} ({when} of the run)", file=sys.stderr)
    try:
        return timing.copy_bandwidth(device, llc_bytes, policy)
    except Exception as error:  # e.g. no memory for the buffers: run without the reference
        notes.add(f"copy bandwidth not measured at the {when}: {type(error).__name__}: "
                  f"{(str(error).splitlines() or [''])[0][:200]}")
        return None


def _copy_reference(start: dict | None, end: dict | None, device: torch.device) -> dict | None:
    """The copy bandwidth the rows are compared with: the faster of the
    measurements at the start and at the end of the run (a drop between them
    means the device was shared or throttled), both kept under start / end."""
    measured = [m for m in (start, end) if m is not None]
    if not measured:
        return None
    best = max(measured, key=lambda m: m["gbps"])
    return {**best, "device_name": system.device_name(device), "start": start, "end": end,
            "chosen": "start" if best is start else "end"}


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def method_text(config: runner.Config, llc_bytes: int) -> list[str]:
    p = config.policy
    repeats = (f"{p.repeats} timed steps" if p.repeats is not None else
               f"enough timed steps to fill ~{p.target_s} s ({p.min_repeats} to {p.max_repeats})")
    return [
        "Copy bandwidth (the device's reference): `dst.copy_(src)` of two buffers far beyond the "
        "last-level cache (1 GiB each on CUDA; ≥ 4× LLC and ≥ 256 MiB on CPU), bytes moved = read + "
        "write = 2 × size, median of repeated copies after warm-up, timed like the steps; measured at "
        "the start and at the end of the run, the faster median is the reference.  **% copy BW** = "
        "a row's GB/s (the bytes the optimizer must move per step) / that bandwidth.",
        "Timing: params and grads are random normal; the first step creates optimizer state (untimed), "
        "then untimed warm-up steps (≥1, ~0.2 s; the first one measures memory), then "
        f"{repeats}; median, min and max of per-step times (time.perf_counter on CPU; CUDA events "
        "after a synchronize on CUDA).  Everything runs under torch.no_grad().",
        f"fastopt-reference (pure PyTorch, slow) runs only on workloads up to "
        f"{config.reference_max_numel:,} elements and with at most {config.reference_max_repeats} timed steps.",
        runner.cache_policy_text(llc_bytes, config.rotation_factor),
        "Peak extra memory (extra MiB; measured for the first dtype only, not on `overhead`): bytes a "
        "steady-state step allocates beyond what is live before it, "
        "from torch.profiler's allocator events on CPU (torch.cuda peak stats on CUDA); memory that "
        "bypasses torch's allocator is not counted, so it is a lower bound.",
        "speedup_vs_torch compares with the fastest of torch-forloop / torch-foreach / torch-fused that ran "
        "for the same workload, dtype and option set; DeepSpeed and Apex are not part of that baseline.",
        "Option sets with a max_grad_norm (Adam + GradScaler + clip) time a training pipeline's optimizer "
        "part on set grads: torch = `scaler.unscale_` + `clip_grad_norm_` + `scaler.step` + `scaler.update` "
        "with the implementation's torch.optim flags; fastopt = `fastopt.GradScaler` + `max_grad_norm=` "
        "(bench/implementations.py, PipelineStep).  Scale 1.0 without growth, so the grads stay finite and "
        "unchanged by torch's unscale; every row checks that no step was skipped.  Their GB/s counts one more "
        "grad read (the norm); the roofline has no pipeline variant.",
    ]
