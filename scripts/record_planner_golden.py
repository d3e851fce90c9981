"""Record plan() of every method on SD 1.5 and SDXL into tests/data/planner_golden.json (issue 13 golden).

    FASTUNLEARN_CACHE_DIR=off python scripts/record_planner_golden.py tests/data/planner_golden.json
"""
import json, time, sys
from fastunlearn.planner import plan
import fastunlearn as fu
rows = {}
for model in ("sd15", "sdxl"):
    for method in sorted(fu.methods.REGISTRY):
        for lora in (None, 16):
            t = time.time()
            p = plan(model, method=method, lora_rank=lora, resolution=512 if model == "sd15" else 1024,
                     gradient_checkpointing=True)
            d = p.as_dict(); d.pop("trace_seconds")
            rows[f"{model}/{method}/lora={lora}"] = d
            print(model, method, lora, round(time.time()-t,1), p.peak_gib, flush=True)
json.dump({"_comment": "plan() of every method on SD 1.5 (512 px) and SDXL (1024 px), checkpointing on, full weights and LoRA r=16: recorded before the redesign of issue 13 (tests/test_planner.py compares)", "plans": rows}, open(sys.argv[1], "w"), indent=1)
