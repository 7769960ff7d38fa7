// The CUDA kernels and driver (csrc/cuda/optimizer_kernels.cu), compiled as
// host C++ against the emulated runtime of cuda_emulation/ (Note [CUDA
// emulation]), which CMakeLists.txt puts first on this file's include path.
#include "../cuda/optimizer_kernels.cu"
