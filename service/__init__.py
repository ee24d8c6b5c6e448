"""The serving side: the HTTP app (``app``: routes), its shared state and admission (``state``, ``admission``),
one request's steps (``segment``), uploads (``uploads``), errors (``errors``), the dynamic batcher
(``batching``), the image -> JSON pipeline (``pipeline``, ``encoding``), logs and request ids (``logs``), and a
Python client (``client``). The runners are in :mod:`runtimes`."""
