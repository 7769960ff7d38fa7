// The CUDA kernels and driver that are not an optimizer of the table
// (csrc/cuda/optimizer_kernels.cu), compiled as host C++ against the
// emulated runtime of cuda_emulation/ (Note [CUDA emulation]), which
// CMakeLists.txt puts first on this file's include path.  Each optimizer's
// kernels come from its generated unit (Note [The optimizer table]).
#include "../cuda/optimizer_kernels.cu"
