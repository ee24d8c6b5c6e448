"""The torch-free, HTTP-free steps from image bytes to JSON, shared by the service, ``m2f predict``, ``m2f eval``
and ``m2f batch`` (numpy, Pillow and pycocotools only):

- :mod:`pipeline.config`: the checkpoint's configuration (architecture, pre-processing, labels, post-processing
  defaults); :mod:`pipeline.labels`, :mod:`pipeline.label_sets`: class names and the public label sets;
- :mod:`pipeline.processing`: decode (EXIF, modes, limits), resize, normalize, pad;
- :mod:`pipeline.batch`: which waiting images share a forward pass, padding them into one array, and the
  start-up batch profile;
- :mod:`pipeline.postprocess`: class and mask logits -> semantic map, instances, panoptic segments;
- :mod:`pipeline.rle`, :mod:`pipeline.encoding`: COCO RLE and the JSON records;
- :mod:`pipeline.steps`: the steps above as one request runs them (``decode``, ``prepare``, ``answer``).
"""
