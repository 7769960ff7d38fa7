"""Parameter shape lists the benchmark steps over."""
from __future__ import annotations

import math
from dataclasses import dataclass

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    shapes: tuple[Shape, ...]
    # Measures the fixed per-step cost: tiny, cache-resident on purpose, never rotated.
    overhead: bool = False
    devices: tuple[str, ...] = ("cpu", "cuda")  # where it is run

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)


def gpt2_shapes(d: int, layers: int) -> list[Shape]:
    """GPT-2 as in Hugging Face's GPT2Model (Conv1D weights are in x out);
    lm_head is tied to wte so it is not a separate parameter."""
    ff, qkv = 4 * d, 3 * d
    shapes: list[Shape] = [(50257, d), (1024, d)]  # wte, wpe
    for _ in range(layers):
        shapes += [
            (d,), (d,),            # ln_1 weight, bias
            (d, qkv), (qkv,),      # attn.c_attn weight, bias
            (d, d), (d,),          # attn.c_proj weight, bias
            (d,), (d,),            # ln_2 weight, bias
            (d, ff), (ff,),        # mlp.c_fc weight, bias
            (ff, d), (d,),         # mlp.c_proj weight, bias
        ]
    shapes += [(d,), (d,)]  # ln_f weight, bias
    return shapes


def gpt2_block_matrices(d: int, layers: int) -> list[Shape]:
    """The 2-D weights of GPT-2's blocks (no embeddings): what Muon takes."""
    return [shape for shape in gpt2_shapes(d, layers)[2:] if len(shape) == 2]


def resnet50_shapes() -> list[Shape]:
    """torchvision.models.resnet50() parameters in registration order:
    conv weights (no bias), BatchNorm weight and bias, fc weight and bias."""
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]  # conv1, bn1
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            out = width * 4
            shapes += [(width, inplanes, 1, 1), (width,), (width,)]  # conv1, bn1
            shapes += [(width, width, 3, 3), (width,), (width,)]     # conv2, bn2
            shapes += [(out, width, 1, 1), (out,), (out,)]           # conv3, bn3
            if block == 0:
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]    # downsample conv, bn
            inplanes = out
    shapes += [(1000, 2048), (1000,)]  # fc
    return shapes


def lora_shapes(layers: int = 200, rank: int = 8, dim: int = 4096) -> list[Shape]:
    """LoRA adapters: ``layers`` pairs A (rank x dim) and B (dim x rank)."""
    return [shape for _ in range(layers) for shape in ((rank, dim), (dim, rank))]


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("flat", "one tensor of 16M elements", ((16 * 2**20,),)),
        Workload("4000x1000", "4000 tensors of 1000 elements", ((1000,),) * 4000),
        Workload("lora", "400 LoRA adapter tensors: 200 x ((8, 4096), (4096, 8))",
                 tuple(lora_shapes())),
        Workload("resnet50", "the 161 parameters of torchvision ResNet-50", tuple(resnet50_shapes())),
        Workload("gpt2-124m", "the 148 parameters of GPT-2 small (lm_head tied)",
                 tuple(gpt2_shapes(768, 12))),
        # 1.56B params: its fp32 Adam state alone is 25 GB, so GPU only.
        Workload("gpt2-xl", "the 580 parameters of GPT-2 XL (1.56B, lm_head tied)",
                 tuple(gpt2_shapes(1600, 48)), devices=("cuda",)),
        # Matrices only, for Muon (2-D params; its Newton-Schulz matmuls are the
        # step's cost, in bfloat16: minutes per step of GPT-2's on a CPU
        # without bfloat16 matrix instructions, so the CPU gets small ones).
        Workload("matrices-64x256", "32 matrices of 64 x 256", ((64, 256),) * 32),
        Workload("gpt2-124m-matrices", "the 48 block weight matrices of GPT-2 small (85M)",
                 tuple(gpt2_block_matrices(768, 12)), devices=("cuda",)),
        Workload("overhead", "100 tensors of 1 element: the fixed per-step cost", ((1,),) * 100,
                 overhead=True),
    )
}

assert WORKLOADS["gpt2-124m"].num_tensors == 148
assert WORKLOADS["gpt2-xl"].num_tensors == 580
assert WORKLOADS["resnet50"].num_tensors == 161
assert WORKLOADS["gpt2-124m-matrices"].num_tensors == 48
