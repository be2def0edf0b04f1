"""Data for the lossy passes: calibration samples (a user's file or generated), running a model
to observe its tensors on them, and fidelity against the original model.

Shared by pruning, quantization and the passes that follow; no pass of its own.
"""
