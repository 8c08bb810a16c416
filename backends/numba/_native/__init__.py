"""The only code of bpkernels that touches other libraries' private internals (Numba's
compiler, llvmlite, OpenBLAS): each use gated and self-tested, with a plain fallback."""
