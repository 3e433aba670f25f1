"""Step 1 of the offline compile check: run the CPU kernel tests under the interpreter and
record every distinct kernel specialization they launch (to /tmp/launches.json).

Step 2, ``compile_check_sm90.py`` (in a fresh process, interpreter off), compiles each for
sm_90 with the local Triton and ptxas, no GPU needed, and reports failures and register
spills. It catches what the interpreter cannot: code in branches a test never takes at run
time still has to compile (a BatchNorm-eval compile error was found on the GPU before this
existed). Not a test; takes a few minutes.

    K="not gpu" PYTHONPATH=src python benchmarks/compile_check_record.py
    PYTHONPATH=src python benchmarks/compile_check_sm90.py
"""
import os, sys, warnings, inspect
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import help_if_asked
help_if_asked(__doc__, sys.argv)
os.environ["TRITON_INTERPRET"] = "1"
warnings.filterwarnings("ignore")
import torch, triton.language as tl
from triton.runtime import interpreter as I
calls = {}
orig = I.GridExecutor.__call__
def rec(self, *args, **kwargs):
    fn = self.fn
    params = list(inspect.signature(fn).parameters.values())
    sig, consts, attrs = {}, {}, {}
    allargs = dict(zip([p.name for p in params], args)); allargs.update(kwargs)
    for i, p in enumerate(params):
        v = allargs.get(p.name, p.default)
        if "constexpr" in str(p.annotation):
            consts[p.name] = v; sig[p.name] = "constexpr"; continue
        if v is None:
            consts[p.name] = None; sig[p.name] = "constexpr"; continue
        if isinstance(v, torch.Tensor):
            t = {torch.float32:"fp32", torch.float64:"fp64", torch.float16:"fp16", torch.bfloat16:"bf16", torch.uint8:"u8", torch.bool:"i1"}[v.dtype]
            sig[p.name] = "*" + t; attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            if v == 1: consts[p.name] = 1; sig[p.name] = "constexpr"; continue
            sig[p.name] = "i32" if abs(v) < 2**31 else "i64"
            if v % 16 == 0: attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):  # Triton passes a float as fp32 unless the parameter is annotated (eps: tl.float64)
            sig[p.name] = "fp64" if str(p.annotation).replace("tl.", "") in ("float64", "fp64") else "fp32"
        else:
            raise TypeError((p.name, type(v)))
    nw = kwargs.get("num_warps", 4)
    key = (fn.__name__, tuple(sorted((k, str(v)) for k, v in sig.items())), tuple(sorted((k, str(v)) for k, v in consts.items())), tuple(sorted(attrs)), nw)
    calls[key] = (self.fn, sig, consts, attrs, nw)
    return orig(self, *args, **kwargs)
I.GridExecutor.__call__ = rec
sys.argv = ["pytest"]
import pytest
pytest.main(["-q", "-x", "-p", "no:cacheprovider", "tests/kernels", "-k", os.environ.get("K", "")])
print("distinct launches:", len(calls))
import json
out = []
for key, (fnpy, sig, consts, attrs, nw) in calls.items():
    out.append(dict(module=fnpy.__module__, name=fnpy.__name__, sig=sig,
                    consts={k: (("tl." + str(v)) if isinstance(v, tl.dtype) else v) for k, v in consts.items()},
                    attrs=[list(k) for k in attrs], nw=nw))
json.dump(out, open("/tmp/launches.json", "w"))
