"""Tools on top of the model, the runtimes and the service: the ``m2f`` command line (``cli``), bulk
segmentation on Ray Data (``bulk``, ``bulk_io``), evaluation (``evaluate``, ``eval_data``, ``metrics``) and
backend comparison reports (``eval_report``, ``eval_images``, ``report_html``), synthetic data (``synth``)
and overlays (``visualize``)."""
