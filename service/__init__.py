"""The serving side: the HTTP app (``app``: routes) and its server (``server``: uvicorn, connection bounds,
drain), the shared state and start-up (``state``), one request top to bottom (``segment``), uploads
(``uploads``), the scheduler that admits requests and runs their steps and batches (``scheduler``; the start-up
batch profile in ``batching``), the image -> JSON pipeline (``pipeline``, ``encoding``), errors (``errors``),
logs and request ids (``logs``), metrics (``metrics``), and a Python client (``client``). The runners are in
:mod:`runtimes`."""
