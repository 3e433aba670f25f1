"""Step 2 of the offline compile check (see compile_check_record.py): compile every recorded
launch for sm_90, report failures and register spills (STACK > 0)."""
import json, importlib, os, re, subprocess, sys, tempfile, warnings
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import help_if_asked
help_if_asked(__doc__, sys.argv)
warnings.filterwarnings("ignore")
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
CUOBJ = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
target = GPUTarget("cuda", 90, 32)
bad = spills = 0
L = json.load(open("/tmp/launches.json"))
seen = set()
for c in L:
    TL = {"tl.fp32": tl.float32, "tl.fp64": tl.float64}
    consts = {k: (TL[v] if isinstance(v, str) and v.startswith("tl.") else v) for k, v in c["consts"].items()}
    key = json.dumps([c["name"], c["sig"], c["consts"], c["attrs"], c["nw"]], sort_keys=True, default=str)
    if key in seen: continue
    seen.add(key)
    fn = getattr(importlib.import_module(c["module"]), c["name"])
    attrs = {tuple(a): [["tt.divisibility", 16]] for a in c["attrs"]}
    try:
        k = triton.compile(ASTSource(fn=fn, signature=c["sig"], constexprs=consts, attrs=attrs), target=target, options={"num_warps": c["nw"]})
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"]); path = f.name
        ru = subprocess.run([CUOBJ, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        stack = int(re.search(r"STACK:(\d+)", ru).group(1))
        if stack:
            spills += 1; print("SPILL", c["name"], stack, {k: v for k, v in c["consts"].items() if v is not None})
    except Exception as e:
        bad += 1
        print("FAIL", c["name"], c["consts"], str(e)[-800:])
print("compiled", len(seen), "failures:", bad, "with stack:", spills)
