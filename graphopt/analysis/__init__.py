"""Read-only analyses of a model: counts, shapes, FLOPs. Nothing here mutates a graph."""
