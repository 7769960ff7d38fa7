"""What torch.compile needs from fastopt's ops (Note [Compiled steps] in
fastopt/optimizer.py): fake (meta) implementations of the list ops, which
only say what comes out, and ``fastopt::rounding_seed``, the draw of a
stochastic rounding seed as an op.

The list ops return nothing and change only the tensors their schemas mark
``(a!)`` (csrc/optimizer_ops.cpp), so their fake implementations do nothing:
functionalization learns what they mutate from the schema.  The bound ops
(csrc/bound_ops.cpp) are never traced: their argument is a script object.
"""
from typing import Optional

import torch
from torch import Tensor


def mutating_list_ops() -> list[str]:
    """The in-place list ops of the loaded extension (one per row of the
    optimizer table, the roofline and row_col_sq_means_): no outputs,
    mutations declared in their schemas.  The bound ops end in ``_bound_`` and are left out."""
    names = (schema.name.split("::", 1)[1] for schema in torch._C._jit_get_all_schemas()
             if schema.name.startswith("fastopt::"))
    return sorted(name for name in names if name.endswith("_") and not name.endswith("_bound_"))


def _no_output(*args, **kwargs) -> None:
    return None


def _grad_sq_norm_fake(grads: list[Tensor]) -> Tensor:
    device = grads[0].device if grads else torch.device("cpu")
    return torch.empty((), dtype=torch.float64, device=device)


def register_fakes() -> None:
    """Registers the fake implementations of the compiled list ops (called
    once, after fastopt._C has defined them)."""
    for name in mutating_list_ops():
        torch.library.register_fake(f"fastopt::{name}", _no_output)
    torch.library.register_fake("fastopt::grad_sq_norm", _grad_sq_norm_fake)


def draw_rounding_seed(like: Optional[Tensor] = None) -> int:
    """A fresh stochastic rounding seed from torch's default generator (one
    draw per bucket and step).  ``like`` is unused: it gives the op a device."""
    return int(torch.randint(2**31, (), dtype=torch.int64).item())


# The same draw as an op, for compiled steps: opaque to the compiler, so it
# runs the default generator exactly as the eager step does (the compiler's
# own random numbers would differ), and its int output stays in the graph.
rounding_seed_op = torch.library.custom_op("fastopt::rounding_seed", draw_rounding_seed, mutates_args=())


@rounding_seed_op.register_fake
def _rounding_seed_fake(like: Optional[Tensor] = None) -> int:
    return torch.library.get_ctx().new_dynamic_size()
