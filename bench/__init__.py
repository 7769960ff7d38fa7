"""fastopt's benchmark harness: ``python -m bench`` (see ``python -m bench --help``).

Measures one optimizer step of fastopt (fused kernels and the pure-PyTorch
reference) against torch.optim (for-loop, foreach, fused), DeepSpeed's CPU
optimizers when importable, and the roofline op ``torch.ops.fastopt.roofline_bound_``
(the same streams moved with trivial arithmetic), all in one run, plus the
device's copy bandwidth (``dst.copy_(src)`` far beyond the cache) as a
reference; writes results.json, report.md and PNG plots (DESIGN.md, section
Benchmarks).  ``bench/gpu_run.sh [OUT]`` runs the CUDA measurements in one command (its
report.md has a Targets table: GPT-2 XL Adam at 0.9× the copy bandwidth and
at least torch's fused Adam, 4000 × 1000 Adam 1.3× torch's fused Adam).

Modules: workloads (parameter shape lists), optimizers (option sets and the
state tensors they keep), implementations (how each implementation builds a
step), timing (timers, warm-up/repeat policy, cache rotation, peak extra
memory), system (device and cache facts), runner (the benchmark loop),
report (results.json, report.md, plots), progress (the stderr progress bar),
cli (argument parsing).
"""
