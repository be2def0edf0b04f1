"""Differential conformance: ONNX backend node cases and light zoo models vs graphopt."""
