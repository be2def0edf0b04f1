"""TensorRT backend: lint a model against TensorRT's ONNX parser and build engines.

Written once against the TensorRT Python API; :mod:`.module` finds ``tensorrt`` (enterprise
TensorRT 10/11) or ``tensorrt_rtx`` (TensorRT for RTX, whose builder runs ahead of time
without a GPU). Nothing here imports either at module level: lint's static rule table
(:mod:`.rules`) works without them.
"""
