"""zeroopt's C kernels for the CPU: the update rules' one-pass steps and the gradient harvest.

build.py compiles a C file with the system's compiler (cached); library.py calls its kernels
on torch tensors; kernels.h says what every kernel shares. Each rule keeps its torch path for
other devices and dtypes, and the tests hold the two to each other.
"""
