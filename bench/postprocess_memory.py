"""Peak memory of post-processing + RLE encoding for a 100-query, 133-class model at a given image size.

    python bench/postprocess_memory.py panoptic 1500 2000     # task, original height, width
    python bench/postprocess_memory.py instance 3000 4000

Prints one JSON line: the peak RSS over the RSS before the call (MB; the peak is reset through
/proc/self/clear_refs after the inputs are made, so their temporaries do not count) and the number of
segments. Linux only. ``tests/test_postprocess_memory.py`` runs it against the bound stated in docs/serving.md.
"""

import json
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import encoding  # noqa: E402
from pipeline import postprocess as post  # noqa: E402

task, H, W = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
Q, K = 100, 133
rh, rw = 1000, 1333  # the image resized for the model (shortest edge 800 -> here 1000, longest 1333)
h, w = -(-rh // 32) * 8, -(-rw // 32) * 8  # (h, w) mask logits at 1/4 of the padded input
rng = np.random.default_rng(0)
class_logits = np.full((1, Q, K + 1), -5.0, np.float32)
class_logits[0, np.arange(Q), np.arange(Q) % K] = 10.0  # every query confident: all take part
coarse = rng.standard_normal((1, Q, h // 16 + 1, w // 16 + 1), dtype=np.float32) * 3
mask_logits = np.ascontiguousarray(np.repeat(np.repeat(coarse, 16, 2), 16, 3)[:, :, :h, :w])  # blobs
args = (class_logits, mask_logits, [(rh, rw)], [(H, W)])


def status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1e3  # kB


with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS: the inputs' temporaries do not count
base = status_mb("VmRSS")
if task == "panoptic":
    r = post.panoptic_segmentation(*args, thing_ids=set(range(80)), threshold=0.5, overlap_mask_area_threshold=0.0)[0]
    records = encoding.panoptic_records(r.segmentation, r.segments, {}, set(range(80)))
else:
    r = post.instance_rles(*args, max_instances=100)[0]
    records = encoding.instance_records(r.rles, r.labels, r.scores, {}, set())
print(json.dumps({"peak_mb": status_mb("VmHWM") - base, "segments": len(records)}))
