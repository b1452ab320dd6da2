"""One 'machine start': compile + first call, print timings and compile counts as JSON."""
import json, os, sys, time
t0 = time.time()
sys.path.insert(0, os.path.dirname(__file__))
import torch
import castore_proto as cp
mode = sys.argv[1]  # none | kv | kv+so
if mode != "none":
    cp.install(os.environ["CASTORE_STORE"], so=(mode == "kv+so"))
else:
    cp.install_counter()
from torch._dynamo.utils import counters
torch.manual_seed(0)
layers = []
for _ in range(4):
    layers += [torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.LayerNorm(256)]
m = torch.nn.Sequential(*layers)
x = torch.randn(32, 256)
cm = torch.compile(m)
t1 = time.time()
with torch.no_grad() if os.environ.get("NOGRAD") else torch.enable_grad():
    y = cm(x)
    if not os.environ.get("NOGRAD"):
        y.sum().backward()
t2 = time.time()
print(json.dumps({"mode": mode, "import_s": round(t1 - t0, 2), "first_call_s": round(t2 - t1, 2),
                  "counts": cp.COUNTS,
                  "fx": {k: v for k, v in counters["inductor"].items() if "fxgraph" in k},
                  "aot": {k: v for k, v in counters["aot_autograd"].items() if "autograd_cache" in k}}))
