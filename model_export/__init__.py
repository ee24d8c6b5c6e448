"""Export stage: weights -> ONNX (``model_export.onnx``), with the runtime metadata in ``model_format.metadata``.

Importing this package does not import torch; ``model_export.onnx`` (the exporter) does.
"""
