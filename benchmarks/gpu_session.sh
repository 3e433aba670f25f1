#!/usr/bin/env bash
# One device-machine session: GPU tests, the tuning sweep, the benchmark; logs and JSON to $OUT.
#   bash benchmarks/gpu_session.sh [tests|tests-warm] [tune] [bench|bench-quick|bench-nocompile] [host]
# tests-warm: the GPU tests with the benchmark's kernels compiled beside them (3 processes),
# so a bench step after it times without compiling. host: host time per call, this checkout
# with and without the direct launches, and the one at $BEFORE_SRC (a src/ folder) if set.
# Run from the repository root (PYTHONPATH is set to ./src). Each step has its own timeout so
# one slow step cannot eat the others' time. The test steps run pytest -n 8: they need
# pytest-xdist (pip install pytest-xdist), which the project's dev extra does not install.
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
for step in "$@"; do
  t0=$(date +%s)
  case $step in
    tests) timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest tests/kernels -m gpu -q -n 8 --maxfail=30 -p no:cacheprovider >"$OUT/gpu_tests.log" 2>&1
           echo "tests rc=$?"; tail -n 25 "$OUT/gpu_tests.log" ;;
    tests-warm) for i in 0 1 2; do timeout "${TESTS_TIMEOUT:-240}" python3 benchmarks/bench_gpu.py --warmup-only --shard $i/3 >"$OUT/warm$i.log" 2>&1 & done
           [ -n "${BEFORE_SRC:-}" ] && timeout "${TESTS_TIMEOUT:-240}" python3 benchmarks/profile_gpu.py --host-only --n 1 \
             --src "$BEFORE_SRC" --out /dev/null >"$OUT/warm_before.log" 2>&1 &
           timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest tests/kernels -m gpu -q -n 8 --maxfail=30 -p no:cacheprovider >"$OUT/gpu_tests.log" 2>&1
           echo "tests rc=$?"; wait; tail -n 25 "$OUT/gpu_tests.log"; cat "$OUT"/warm*.log | grep -v "^$" | tail -n 6 ;;
    host) for v in after after_nofast before; do
            src=$PWD/src; env=""
            [ $v = after_nofast ] && env="NORMLAB_FAST_LAUNCH=0"
            if [ $v = before ]; then [ -n "${BEFORE_SRC:-}" ] || continue; src=$BEFORE_SRC; fi
            env $env timeout "${HOST_TIMEOUT:-60}" python3 benchmarks/profile_gpu.py --host-only --src "$src" \
              --out "$OUT/host_$v.txt" --json "$OUT/host_$v.json" >"$OUT/host_$v.log" 2>&1
            echo "host $v rc=$?"; grep -E "empty|fwd\+bwd" "$OUT/host_$v.log"
          done ;;
    profile) timeout "${PROFILE_TIMEOUT:-120}" python3 benchmarks/profile_gpu.py --out "$OUT/profile.txt" >"$OUT/profile.log" 2>&1
          echo "profile rc=$?"; grep -E "launch|torch.empty|host|===|GB/s" "$OUT/profile.log" ;;
    tune) timeout "${TUNE_TIMEOUT:-200}" python3 benchmarks/tune_gpu.py "$OUT/tune.json" >"$OUT/tune.log" 2>&1
          echo "tune rc=$?"; sed -n '/^best:/,$p' "$OUT/tune.log" ;;
    bench) timeout "${BENCH_TIMEOUT:-360}" python3 benchmarks/bench_gpu.py --out "$OUT/gpu.json" >"$OUT/bench.log" 2>&1
           echo "bench rc=$?"; grep -A70 "^targets met" "$OUT/bench.log" ;;
    bench-quick) timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/bench_gpu.py --quick --out "$OUT/gpu_quick.json" >"$OUT/bench_quick.log" 2>&1
           echo "bench-quick rc=$?"; grep -A40 "^targets met" "$OUT/bench_quick.log" ;;
    bench-nocompile) timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_gpu.py --no-compile --out "$OUT/gpu_nocompile.json" >"$OUT/bench_nocompile.log" 2>&1
           echo "bench-nocompile rc=$?"; grep -A40 "^targets met" "$OUT/bench_nocompile.log" ;;
    *) echo "unknown step $step" ;;
  esac
  echo "step $step took $(( $(date +%s) - t0 )) s"
done
