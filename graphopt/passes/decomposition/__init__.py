"""Module-level decomposition (MoDeGPT): MLP, Q/K and V/O inner dimensions reduced jointly."""
