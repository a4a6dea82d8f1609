"""GPU kernels of lowrank, installed as ``lowrank.kernels``: Triton in triton/, CUDA C in cupy/.

No optimizer logic here; each op has a torch reference of the same name in ``lowrank/``.
"""
