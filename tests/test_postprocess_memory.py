"""The post-processing memory bound stated in README ("Limits"), measured in a subprocess.

A 100-query, 133-class model's logits post-processed for a 2000 x 1500 image: the old path held
(queries, H, W) float32 at the original size (1.2 GB here; ~14 GB at 36 MP), the strip path holds the
full-size maps and one strip. The bound: 64 MB + 32 MB per megapixel of the original image, for any
number of queries.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BOUND_BASE_MB, BOUND_PER_MP = 64, 32

SCRIPT = r"""
import json, sys
import numpy as np
from mask2former import postprocess_numpy as post
from service import encoding

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
    for line in open("/proc/self/status"):
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
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads and resets the peak RSS in /proc (Linux)")
@pytest.mark.parametrize("task", ["panoptic", "instance"])
def test_post_processing_peak_memory_stays_under_the_stated_bound(task):
    height, width = 1500, 2000
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, task, str(height), str(width)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    bound = BOUND_BASE_MB + BOUND_PER_MP * height * width / 1e6  # 160 MB
    old = 100 * height * width * 4 / 1e6  # (queries, H, W) float32: 1200 MB
    assert result["segments"] > 50  # the work was done: most queries give a segment
    assert result["peak_mb"] < bound < old / 5, result
