"""The exported ONNX file's format, shared by the exporter that writes it and the runtimes that read it: the
metadata inside the file (:mod:`model_format.metadata`) and how int8 weights are stored
(:mod:`model_format.int8`)."""
