"""Low-rank error compensation (EoRA) for layers another lossy pass changed; no pass of its own."""
