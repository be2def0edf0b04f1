"""graphopt.backends."""
