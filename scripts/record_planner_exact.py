"""Record `plan(..., vram=24, auto=True)` of the seed methods on SDXL (1024 px) and SD 1.5 (512 px), cold, with
the exact bytes of every trace its search made, into tests/data/planner_exact_golden.json (issue 14: the planner
made faster must answer byte for byte as before; tests/test_planner.py compares).

    FASTUNLEARN_CACHE_DIR=off python scripts/record_planner_exact.py tests/data/planner_exact_golden.json [model/method ...]
"""
import json
import sys
import time

from fastunlearn import planner

ROWS = ["sdxl/siss", "sdxl/erasediff", "sdxl/esd", "sdxl/sfd", "sd15/siss", "sd15/siss-nois", "sd15/naive",
        "sd15/neggrad", "sd15/erasediff", "sd15/esd", "sd15/sfd"]


def record(key: str) -> dict:
    """The plan (without its time) and the answers of the traces behind it, in a stable order."""
    model, method = key.split("/")
    planner.search._TRACES.clear()
    p = planner.plan(model, method=method, resolution=1024 if model == "sdxl" else 512, vram=24, auto=True)
    d = p.as_dict()
    d.pop("trace_seconds")
    return {"plan": d, "traces": planner.search.cached_traces()}


if __name__ == "__main__":
    path, keys = sys.argv[1], sys.argv[2:] or ROWS
    rows = {}
    for key in keys:
        t = time.time()
        rows[key] = record(key)
        print(key, round(time.time() - t, 1), rows[key]["plan"]["peak_gib"], flush=True)
    json.dump({"_comment": "plan(model, method, resolution, vram=24, auto=True), cold, and the exact bytes of every "
               "trace behind it (per batch and optimizer kind): the planner before issue 14's speed-up (commit "
               "763e1c1; scripts/record_planner_exact.py). tests/test_planner.py compares byte for byte.",
               "plans": rows}, open(path, "w"), indent=1, sort_keys=True)
