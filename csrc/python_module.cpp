// The Python module fastopt._C.  Importing it loads this library, whose
// static initializers register the fastopt ops with torch (TORCH_LIBRARY);
// Python reaches the kernels through torch.ops.fastopt, so the module itself
// exports nothing.
#include <Python.h>

static struct PyModuleDef fastopt_module = {PyModuleDef_HEAD_INIT, "_C",
                                            "fastopt's compiled kernels (see torch.ops.fastopt)",
                                            -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastopt_module); }
