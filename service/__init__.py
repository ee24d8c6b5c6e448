"""The serving side: the HTTP app (``app``: routes) and its server (``server``: uvicorn, connection bounds,
drain), the shared state and start-up (``state``), one request top to bottom (``segment``), uploads
(``uploads``), the scheduler that admits requests and runs their steps and batches (``scheduler``), errors
(``errors``), logs and request ids (``logs``), metrics (``metrics``), and a Python client (``client``). The
steps a request runs are in :mod:`pipeline`, the runners in :mod:`runtimes`."""
