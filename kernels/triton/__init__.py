"""Triton kernels: <op>.py holds _<op>_kernel and the <op>_triton launcher."""
