"""C kernels for the CPU (compiled on first use with the system C compiler, loaded by ctypes)."""
