"""The child process of :func:`bench.common.closed_loop_elsewhere`: closed-loop HTTP clients at a lower priority.

    python bench/loadgen.py REQUEST.pickle        # what closed_loop_elsewhere runs; prints one JSON run

Each client sends ``POST /v1/segment`` with the next photo as soon as its answer is in
(:func:`bench.common.closed_loop`). On loopback the clients share the cores with the server: eight client threads
waking up to read answers and send uploads take CPU time from the server's forward pass (and, with OpenMP's
parallel regions, stall both of its threads at once). :func:`bench.common.closed_loop_elsewhere` runs them here,
in a child process at ``nice`` 19, so that the kernel gives the server's threads the cores whenever both want
them: the nearest this machine gets to clients on another host. The child imports httpx, numpy and PIL but no
torch (``bench.common`` defers it), so it starts in well under a second.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import closed_loop  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    request = pickle.loads(Path(args[0]).read_bytes())  # closed_loop's keyword arguments
    print(json.dumps(closed_loop(**request)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
