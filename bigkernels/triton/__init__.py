"""Triton kernels and their launchers, one module per op (bigkernels/triton/<op>.py).

Imported lazily by bigkernels/ops/<op>.py, so that Triton stays optional. On CPU tensors the kernels
run under the Triton interpreter, which needs TRITON_INTERPRET=1 set before this package is imported.
"""
