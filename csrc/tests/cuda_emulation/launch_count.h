// How many kernels the emulated runtime (Note [CUDA emulation]) has launched
// in this process: tests check that a step splits into the launches it
// should.  Separate from cuda_emulation.h, whose CUDA keyword macros must
// not reach translation units that include torch headers.
#pragma once

#include <cstdint>

namespace fastopt::emulation {

inline int64_t launch_count = 0;

}  // namespace fastopt::emulation
