"""The README's first snippet and its learning-rate schedule snippets run as
written, and the bench's output is written for its readers (no internal
issue numbers, a quiet log)."""
from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def test_first_readme_snippet_runs_and_trains():
    snippet = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(snippet, "README.md (first snippet)", "exec"), namespace)
    model, loader, optimizer = namespace["model"], namespace["loader"], namespace["optimizer"]
    assert type(optimizer).__module__.startswith("fastopt")
    assert all(state["step"].item() == len(loader) for state in optimizer.state.values())
    assert len(optimizer.state) == len(list(model.parameters()))


def test_bench_help_names_no_internal_issues():
    from bench import cli

    text = cli.build_parser().format_help()
    assert "issue" not in text.lower()
    assert "gpt2-xl" in text and "left out" in text


def test_bench_progress_without_a_terminal_prints_a_line_every_few_seconds(monkeypatch):
    from bench import progress

    stream = io.StringIO()  # not a TTY
    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    bar = progress.Progress(100, stream=stream)
    for i in range(100):  # one event a second
        now[0] = float(i)
        bar.show(f"item {i}")
        bar.advance()
    bar.close()
    lines = stream.getvalue().splitlines()
    interval = int(progress.LOG_INTERVAL_S)
    # The first event, then one line per LOG_INTERVAL_S seconds, then the end.
    assert [line.rsplit(" ", 1)[-1] for line in lines] == [str(i) for i in range(0, 100, interval)] + ["done"]


def test_lr_schedule_snippets_run(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")  # the snippet saves a plot
    text = README.read_text()
    section = text[text.index("### Learning-rate schedules"):text.index("## Training large models")]
    snippets = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(snippets) == 2
    monkeypatch.chdir(tmp_path)  # the plot is written to the working directory
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the snippets draw random data
    namespace: dict = {}
    try:
        for i, snippet in enumerate(snippets):
            exec(compile(snippet, f"README.md (learning-rate schedules, snippet {i + 1})", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    result, optimizer = namespace["result"], namespace["optimizer"]
    assert 17 <= len(result.lrs) <= 100 and result.suggested_lr in result.lrs
    assert (tmp_path / "lr_range.png").read_bytes().startswith(b"\x89PNG")
    assert optimizer.param_groups[0]["lr"] == 3e-4 and not optimizer.state  # restored
