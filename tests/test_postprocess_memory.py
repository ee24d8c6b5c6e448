"""The post-processing memory bound stated in docs/serving.md ("Limits"), measured in a subprocess.

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

SCRIPT = REPO / "bench" / "postprocess_memory.py"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads and resets the peak RSS in /proc (Linux)")
@pytest.mark.parametrize("task", ["panoptic", "instance"])
def test_post_processing_peak_memory_stays_under_the_stated_bound(task):
    height, width = 1500, 2000
    out = subprocess.run(
        [sys.executable, str(SCRIPT), task, str(height), str(width)],
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
