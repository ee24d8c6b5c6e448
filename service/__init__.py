"""The serving side: the HTTP app (``app``), admission (``admission``), uploads (``uploads``), the dynamic
batcher (``batching``), the runtimes (``runtime``, ``onnx_runtime``), the image -> JSON pipeline
(``pipeline``, ``encoding``), logs and request ids (``logs``), and a Python client (``client``)."""
