#!/usr/bin/env bash
# `make gpu-check OUT=folder`: everything a lent GPU machine should tell us, in one command.
#
# With the machine's own python3 (torch with CUDA, Triton, pytest-xdist; no network): build the
# CUDA extension for the card, run the GPU-relevant tests in parallel, benchmark the op (1024^2
# and 4096^2, TF32 and bf16, both GPU backends, eager and torch.compile where they fit), probe
# where the CUDA kernels' time goes and the Triton kernels' questions (bench/gpu_probe.py and
# its --triton section), read the CUDA kernels' hardware counters with Nsight Compute, and
# later the Triton kernels' (bench/gpu_ncu.py), time a stylisation step
# (bench/bench_stylize.py), run the CUDA backward under compute-sanitizer
# (bench/gpu_sanitize.py) and time tiled steps from 1024^2 to 8192^2, one rank
# (bench/bench_tiled.py, issue 8); the stylisation and the tiled steps need the VGG-19
# weights, which the machine cannot download: carry them in gpu-weights/, see the README.
# Every log goes into OUT, eight files (the device tool brings back at most eight); the tables
# are in the bench logs. Each step has its own time limit, all clipped to one deadline
# (GPU_CHECK_SECONDS, 560 s), and a failing step does not stop the next, so that one 600 s call
# of the device tool holds everything.
#
# QUICK=1: what a lease's second call can afford after the full check (a 900 s lease less the
# full call's 560 s and two start-ups of about 35 s), deadline 260 s with the build. The same
# steps in the same order, the op at 1024^2 only without torch.compile, no sanitizer, no tiled
# rows: build, CUDA probe, ncu, host path, float32 table, tests (about 240 s together: 68ef306's
# times plus ncu's estimate), then bf16, the Triton probe and the stylisation step only as far
# as time is left (at 68ef306, before ncu, a 270 s deadline cut the Triton probe).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
summary="$OUT/summary.txt"
: >"$summary"
rm -f "$OUT"/*.log  # the steps append (several share probe.log: at most eight files come back)

# Every step's limit is clipped to one deadline, so the call ends inside the device tool's
# limit whatever the build takes; a step with no time left is skipped and says so.
quick=${QUICK:-0}
if [ "$quick" = 1 ]; then
  deadline=$(($(date +%s) + ${GPU_CHECK_SECONDS:-260}))
  images=(--image 1024) compile_max=512  # below every image: no torch.compile rows
else
  deadline=$(($(date +%s) + ${GPU_CHECK_SECONDS:-560}))
  images=(--image 1024 4096) compile_max=1024
fi
step() {  # step NAME[:LOG] SECONDS COMMAND...: run, log to OUT/LOG.log (NAME's if no LOG)
  local name=${1%%:*} log=${1#*:} limit=$2 start rc
  shift 2
  start=$(date +%s)
  if ((deadline - start < limit)); then limit=$((deadline - start)); fi
  if ((limit < 5)); then
    echo "== $name: skipped, the deadline has passed" | tee -a "$summary"
    return 124
  fi
  timeout "$limit" "$@" >>"$OUT/$log.log" 2>&1
  rc=$?
  # the card's state as the step ends (a hot or power-capped card slows every later row)
  echo "== $name: rc $rc, $(($(date +%s) - start)) s; $(nvidia-smi --format=csv,noheader \
    --query-gpu=clocks.sm,temperature.gpu,power.draw 2>&1 | head -n 1)" | tee -a "$summary"
  tail -n 25 "$OUT/$log.log" | tee -a "$summary"
  return "$rc"
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton; from torch.utils.cpp_extension import is_ninja_available
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__,
      torch.cuda.get_device_name(), 'ninja', is_ninja_available())"
  git log -1 --format='git %h %s' 2>/dev/null || true
  # the tree can be newer than the copied .git (a lease's second call at 68ef306 read 30c9271)
  echo "files differing from that commit: $(git status --short --untracked-files=no 2>/dev/null | wc -l)"
} 2>&1 | tee -a "$summary"
arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
# Hopper: sm_90a, where the CUDA forward and backward multiply on wgmma (CAST_WGMMA; gpu-notes
# "The CUDA forward on wgmma", "The float32 / 16-bit CUDA backward on wgmma"), never run on a
# card before this check: if they miss the reference on the card, the build is redone for
# plain 9.0 (mma.sync, as every earlier lease ran it) and the summary says so, so that one wrong
# kernel does not cost the lease's tables. The tests that decide it run the forward of every
# dtype and the backward on its wgmma tiles (8-row tiles, r = 3: test_low_precision's bf16 and
# f16, test_large_shape's float32), not the every-element cases (their CPU float64 references
# do not fit the 60 s).
[ "$arch" = 9.0 ] && arch=9.0a

# 107 s on an H100 machine at a37e7bb, when the kernels were one .cu file (nvcc on one core);
# now in parts that ninja compiles at once (predicted 35-50 s: gpu-notes).
step build 240 env TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=16 \
  "$PY" -m pip install --no-index --no-deps --no-build-isolation -e .
if [ "$arch" = 9.0a ]; then
  step wgmma:tests 60 env CAST_TRITON_AUTOTUNE=0 "$PY" -m pytest -x -q --tb=short \
    -p no:cacheprovider -k "cuda and (low_precision or large_shape)" \
    tests/test_gpu.py
  if [ $? -ne 0 ]; then
    echo "== the wgmma kernels failed on the card: rebuilt for 9.0 (mma.sync)" | tee -a "$summary"
    rm -rf build cast/_C*.so  # an older setuptools' develop build could keep the 9.0a objects
    step build-9.0:build 240 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
      "$PY" -m pip install --no-index --no-deps --no-build-isolation -e .
  fi
fi
# The probe first: it runs the CUDA kernels alone, so if they crash the card (a lost CUDA
# context ends the whole process) the benches leave the cuda backend out and keep their other
# rows. Then the float32 table (the numbers a lease is for), the tests, bf16 at 1024^2, the
# Triton probe, the stylisation step and the tiled rows (measured 2026-11-27 on an H100 at
# a37e7bb: build 107 s, probe 6 s, float32 123 s, tests 113 s, bf16 66 s, stylisation 12 s,
# tiled cut at 80 s before its 8192^2 row). The fused rows take 10 timed runs, the baselines 3:
# a median of 3 let one slow run move a row (relu2_1 Triton J = K = 1: median 6.10, best 4.98
# ms); about 10 s more in float32, under 1 s in bf16.
backends=() stylize_backend=cuda
step probe 30 "$PY" bench/gpu_probe.py
probe_rc=$?
if [ "$probe_rc" -ne 0 ] && [ "$probe_rc" -ne 124 ]; then
  echo "== the CUDA kernels failed in the probe: the benches leave them out" | tee -a "$summary"
  backends=(--backends triton,eager,compile) stylize_backend=triton
fi
# Hardware counters for the CUDA kernels (issue 9, gpu-notes "Hardware counters for the CUDA
# kernels"): Nsight Compute on relu1_1's forward and backward, float32 and bf16, each whole and
# as the probe's "no MMA" (bench/gpu_ncu.py: 8 launches), into probe.log: speed of light,
# occupancy, scheduler, each stall reason's cycles an issued instruction and the instructions
# issued; then the MMA phase's warp-cycles by stall reason (whole minus "no MMA", its --read).
# --clock-control none: never change the card's clocks (the device's METHOD.md). It fails soft:
# on a gVisor machine ncu reads no counters ("LibraryNotLoaded"), the step says so, the run goes
# on. Early, so that a short lease has it: estimated 30-50 s (about 40 replays of each of 8
# kernels of 0.3-3 ms, the process's start under ncu), which the steps at the end give up (the
# full run's tiled rows, QUICK's Triton probe and stylisation).
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1)
stalls='regex:^smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio$'
ncu_args=(--clock-control none --profile-from-start off
  --kernel-name 'regex:_masked_gram_(fwd|bwd|bwd_mma|bwd_simt)_kernel' --print-summary none
  --metrics "$stalls,smsp__inst_issued.sum")
for section in SpeedOfLight Occupancy LaunchStats WarpStateStats SchedulerStats \
  ComputeWorkloadAnalysis MemoryWorkloadAnalysis; do
  ncu_args+=(--section "$section")
done
step ncu:probe 60 env PY="$PY" bash -c 'log=$(mktemp); "$@" 2>&1 | tee "$log"; rc=${PIPESTATUS[0]}
  kernels=$(grep -cE "_masked_gram_.*, Context [0-9]+, Stream" "$log")  # one header a kernel
  "$PY" bench/gpu_ncu.py --read "$log"  # the MMA phase (whole - no MMA) by stall reason
  rm -f "$log"
  echo "== ncu read the counters of $kernels of 8 kernels (rc $rc)"
  [ "$kernels" -ge 8 ] || echo "   none or some: no ncu here, or a runtime that hides them (gVisor)"
  [ "$rc" -eq 0 ] && [ "$kernels" -ge 8 ]' ncu "${ncu:-ncu}" --launch-count 8 "${ncu_args[@]}" \
  "$PY" bench/gpu_ncu.py
# The op's host path on tiny inputs (issue 9, gpu-notes "The op's host path, as built"): ATen
# ops, kernels and µs a call with mass=None and mass=1.0; a few seconds, into probe.log.
step host-path:probe 30 "$PY" bench/host_path.py --device cuda
# 170 s at 30c9271 took 142; the Triton forward's third and fourth configs add about four
# compiles (2026-11-28), so 200
step bench-float32 200 "$PY" bench/bench_masked_gram.py --device cuda "${images[@]}" \
  --dtype float32 --compile-max-image "$compile_max" --warmup 1 --repeats 3 --fused-repeats 10 \
  "${backends[@]}"
# No autotuning in the tests: each shape class compiles once (the bench tunes). Only what runs
# on the GPU or compiles for it: the CPU cases are CI's (on 2026-11-26 the whole three files
# took over 150 s here).
step tests 160 env CAST_TRITON_AUTOTUNE=0 "$PY" -m pytest -n 8 -q --tb=line --durations=10 \
  -p no:cacheprovider -k "cuda or gpu or triton" \
  tests/test_gpu.py tests/test_masked_gram.py tests/test_triton_kernels.py
# 65 s at 30c9271 with 8 compiles; every compile row now compiles (a5a9266: 10 an image, from
# relu3_1 on they had run eager code), about 2 x 5-10 s more, so 110
step bench-bfloat16 110 "$PY" bench/bench_masked_gram.py --device cuda --image 1024 \
  --dtype bfloat16 --compile-max-image "$compile_max" --warmup 1 --repeats 3 --fused-repeats 10 \
  "${backends[@]}"
# The Triton probe: a process of its own, after the benches so that every shipped kernel it
# launches is in Triton's cache (its compiles would take it 20-40 s); it tunes its own keys
# (about 13 s at 30c9271, predicted about 20 s with the third backward config); into probe.log,
# after the CUDA probe.
step triton-probe:probe 60 "$PY" bench/gpu_probe.py --triton
# The Triton kernels' counters (bench/gpu_ncu.py --triton: 5 launches, the forward at relu1_1
# J = K = 3 f32 and bf16 and at relu5_1 J = K = 1 with 64- and 32-channel blocks, the backward
# at relu4_1 J = K = 3 f32; gpu-notes "Triton forward: G holds split 0"): whether their tiles
# wait on L1 misses, on sectors a request or on latency. After the Triton probe, whose runs have
# compiled most of their configs; about 20-40 s.
step ncu-triton:probe 50 env PY="$PY" bash -c 'log=$(mktemp); "$@" 2>&1 | tee "$log"; rc=${PIPESTATUS[0]}
  kernels=$(grep -cE "_masked_gram_.*, Context [0-9]+, Stream" "$log")
  "$PY" bench/gpu_ncu.py --triton --read "$log"  # each kernel by stall reason
  rm -f "$log"
  echo "== ncu read the counters of $kernels of 5 Triton kernels (rc $rc)"
  [ "$rc" -eq 0 ] && [ "$kernels" -ge 5 ]' ncu "${ncu:-ncu}" --launch-count 5 "${ncu_args[@]}" \
  "$PY" bench/gpu_ncu.py --triton
weights=gpu-weights/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin
[ -f "$weights" ] && export CAST_VGG19="$PWD/$weights"
step stylize 30 "$PY" bench/bench_stylize.py --device cuda --backend "$stylize_backend" --size 512 \
  --repeats 3 --no-peer
if [ "$quick" = 1 ]; then
  echo "== done (quick) $(date -u)" | tee -a "$summary"
  exit 0
fi
# The CUDA backward's copy orders under compute-sanitizer (memcheck, racecheck, synccheck; 40 s
# each at most), into probe.log: the review of 2026-11-27 in gpu-notes says what each shows.
step sanitizer:probe 125 bash -c 'for tool in memcheck racecheck synccheck; do
  echo "== compute-sanitizer --tool $tool"
  timeout 40 compute-sanitizer --tool "$tool" "$0" bench/gpu_sanitize.py 2>&1 | tail -n 8
done' "$PY"
# last: the rows it finishes are in its log even if the limit cuts it (one process per row);
# the deadline, not its own limit, ends it where the build is slow
step tiled 150 bash -c '"$0" bench/bench_tiled.py --device cuda --rows curve large --steps 1 &&
  cat "$(ls -t bench/results/*-tiled.md | head -n 1)"' "$PY"
echo "== done $(date -u)" | tee -a "$summary"
