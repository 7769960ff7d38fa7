"""fastopt: torch.optim optimizers whose steps run as fused multi-tensor kernels.

``fastopt.Adam, AdamW, RMSprop, SGD, Adagrad, NAdam, RAdam, Adamax,
Adadelta, ASGD, Rprop, Muon, Adafactor`` take the arguments of their torch.optim namesakes
and keep the same state, so ``state_dict`` moves both ways.
``fastopt.Lion``, ``ADOPT``, ``AdaBound``, ``QHAdam``, ``AggMo`` and the
large-batch ``LAMB`` and ``LARS`` and ``SWATS`` (which torch.optim lacks)
follow the same conventions; ``fastopt.Lookahead`` wraps any
optimizer.  ``fastopt.backends()`` reports which compiled kernels are loaded.
``fastopt.GradScaler`` is torch.amp.GradScaler with one pass over the grads
before a step with ``max_grad_norm``.
``fastopt.lr_range_test`` runs Smith's learning-rate range test with any optimizer.
``fastopt.dequantize_state_dict`` turns the state_dict of an optimizer with
8-bit state (``state_dtype=torch.uint8``) into torch.optim's float32 layout.
"""
from ._extension import backends
from .adabound import AdaBound
from .adafactor import Adafactor
from .adadelta import Adadelta
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .adamax import Adamax
from .adopt import ADOPT
from .aggmo import AggMo
from .amp import GradScaler
from .asgd import ASGD
from .lamb import LAMB
from .lars import LARS
from .lion import Lion
from .lookahead import Lookahead
from .lr_range import LRRangeResult, lr_range_test
from .muon import Muon
from .nadam import NAdam
from .optimizer import dequantize_state_dict
from .qhadam import QHAdam
from .radam import RAdam
from .rmsprop import RMSprop
from .rprop import Rprop
from .sgd import SGD
from .swats import SWATS

__version__ = "0.1.0"
__all__ = ["Adam", "AdamW", "RMSprop", "SGD", "Adagrad", "NAdam", "RAdam", "Adamax", "Adadelta", "ASGD",
           "Rprop", "Lion", "ADOPT", "AdaBound", "QHAdam", "AggMo", "LAMB", "LARS", "SWATS", "Muon", "Adafactor",
           "Lookahead", "GradScaler",
           "lr_range_test", "LRRangeResult", "dequantize_state_dict",
           "backends", "__version__"]
