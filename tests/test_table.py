"""The optimizer table (Note [The optimizer table] in csrc/optimizer_table.h)
against the Python side: every row's list op has a reference function with
the same arguments, every optimizer class runs an op of the table and names
as many state lists as the op takes, and every class is covered by the test
registry (OPTIMIZERS, or MATRIX_OPTIMIZERS for 2-D-only ones).  A new
optimizer that misses one of its places fails here."""
from __future__ import annotations

import inspect

import pytest
import torch

import fastopt
from fastopt import _fake, reference
from fastopt.optimizer import FusedOptimizer
from registry import MATRIX_OPTIMIZERS, OPTIMIZERS

COMPILED = "cpu" in fastopt.backends()["fused_devices"]
needs_extension = pytest.mark.skipif(not COMPILED, reason="fastopt._C is not loaded")

CLASSES = sorted({getattr(fastopt, name) for name in fastopt.__all__
                  if isinstance(getattr(fastopt, name), type)
                  and issubclass(getattr(fastopt, name), FusedOptimizer)}, key=lambda cls: cls.__name__)


def _op_names() -> list[str]:
    """The list ops of the optimizer table (the roofline and the row and
    column sums are no optimizer)."""
    return [name for name in _fake.mutating_list_ops() if name not in ("roofline_", "row_col_sq_means_")]


@needs_extension
def test_every_table_row_has_a_reference_with_its_schema():
    assert _op_names(), "no optimizer ops registered"
    for name in _op_names():
        schema = getattr(torch.ops.fastopt, name).default._schema
        compiled = [argument.name for argument in schema.arguments]
        assert hasattr(reference, name), f"fastopt.reference has no {name}"
        python = list(inspect.signature(getattr(reference, name)).parameters)
        assert python == compiled, f"{name}: reference {python} vs schema {compiled}"
        bound = getattr(torch.ops.fastopt, name[:-1] + "_bound_").default._schema
        bound_keywords = [argument.name for argument in bound.arguments][1:]
        assert bound_keywords == [n for n in compiled if n in bound_keywords and n != "master_params"]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_every_class_runs_an_op_of_the_table(cls):
    assert hasattr(reference, cls._op + "_"), f"{cls.__name__}._op = {cls._op!r} has no reference op"
    arguments = list(inspect.signature(getattr(reference, cls._op + "_")).parameters)
    state_lists = arguments[2:arguments.index("lr")]
    assert len(state_lists) == len(cls._op_slots) + len(cls._scalar_states), (
        f"{cls.__name__}: op takes {state_lists}, class declares {cls._op_slots} + {cls._scalar_states}")
    if COMPILED:
        schema = getattr(torch.ops.fastopt, cls._op + "_").default._schema
        assert [a.name for a in schema.arguments] == arguments


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_every_class_is_in_the_registry(cls):
    assert any(case.fastopt_cls is cls for case in OPTIMIZERS + MATRIX_OPTIMIZERS), (
        f"tests/registry.py has no {cls.__name__} row")
