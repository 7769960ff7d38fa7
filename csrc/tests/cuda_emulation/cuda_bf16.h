// The emulated CUDA runtime (Note [CUDA emulation]) under the name csrc/cuda/
// includes.
#pragma once
#include "cuda_emulation.h"
