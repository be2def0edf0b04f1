"""Low-rank factorization of single weights (plain and activation-aware SVD)."""
