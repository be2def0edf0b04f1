"""Tests of graphopt.kernels: packing, the ORT custom ops, the C++ test binary, the build."""
