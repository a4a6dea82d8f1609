"""CUDA C kernels through CuPy: <op>.cu sources and <op>.py lazy loaders/launchers."""
