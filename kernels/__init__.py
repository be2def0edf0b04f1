"""graphopt.kernels."""
