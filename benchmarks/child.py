"""Entry point of one measurement, run in a fresh interpreter by `harness.measure`.

    python -m benchmarks.child MODULE:FUNCTION PARAMS.json RESULT.json

The task's module is imported first (so imports are not timed), then `FUNCTION(params)` is called once
and timed with a monotonic clock. The result file holds the wall seconds of that call, the process's peak
RSS before the call (interpreter + imports) and whatever the task returned (a JSON-serialisable dict).
"""

from __future__ import annotations

import importlib
import json
import resource
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    task, params_path, result_path = argv
    module_name, _, function_name = task.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    params = json.loads(Path(params_path).read_text())
    idle_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    output = function(params)
    seconds = time.perf_counter() - started
    Path(result_path).write_text(json.dumps({"seconds": seconds, "idle_rss_kb": idle_kb, "output": output}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
