#!/usr/bin/env bash
# The GPU check: every CUDA and Triton kernel of nf4lora run against the reference and
# timed, in one command, on a bare machine with an NVIDIA GPU (issue 17).
#
#   scripts/gpu_check.sh [--quick] [--skip-cuda] OUT_DIR   on the GPU machine
#   scripts/gpu_check.sh --dry-run [OUT_DIR]                anywhere, no GPU (CI): checks
#       that the GPU tests are collected (not zero), that the benchmarks accept the GPU
#       providers (--plan), that every step's command is well-formed, and that the
#       summary step writes its files
#
# What it expects, and finds or installs (a package index is tried once, with short
# timeouts: no network means a quick failure, never a hang):
#   python3 (PYTHON=...) with a CUDA build of torch (>= 2.4) that sees the GPU, triton
#   (>= 3.5: the fp32 matmuls use tl.dot's "bf16x6"), pytest, setuptools and pybind11
#   (the build); nvcc (CUDA toolkit: PATH, CUDA_HOME or /usr/local/cuda) for
#   nf4lora._C_cuda, unless --skip-cuda (then the Triton part runs alone); optional:
#   pytest-xdist and pytest-timeout (parallel tests, a hung test reported), bitsandbytes
#   (the baseline rows; skipped with a note without it).
# A missing requirement prints ONE line, "gpu_check: missing: ...", and exits 3.
#
# Steps (each under a time limit, its output in OUT_DIR/gpu_check.log):
#   env      the GPU, driver, torch / triton / nvcc versions, the GPU's arch sm_XY
#   build    python3 setup.py build_ext --inplace, NF4LORA_CUDA_ARCHS=XY: the CPU and
#            CUDA extensions, the CUDA code for this GPU's arch only
#   compile  the Triton compile report for sm_XY with this machine's triton: registers,
#            spills of every kernel variant (and a warm Triton cache for the tests)
#   tests    pytest -m gpu (the marker: tests/conftest.py): the CUDA backend on CUDA
#            tensors (tests/test_cuda_host.py's gpu variant, codec bit-exact against
#            reference.py, GEMV within the dtype's error), the Triton kernels compiled on
#            CUDA tensors (tests/test_triton_matmul.py's cuda variant: fused, GEMV,
#            split-K, backward, autograd; tests/test_triton_multi_lora.py: the same for
#            mixed-adapter batches; tests/test_gpu_check.py: codec bit-exact)
#   bench    nf4lora bench codec (dequantize) and nf4lora bench matmul (lora forward and
#            train = forward + backward, M = 1, 8, 64, 512, the Llama-7B shapes) with
#            --device cuda: nf4lora[cuda] (and without its route to Triton: dequantize +
#            cuBLAS past its GEMV), nf4lora[triton] (and without split-K), bitsandbytes,
#            dense bf16 F.linear; kernel time, GB/s, share of HBM bandwidth;
#            bench.bench_multi_lora --device cuda: a mixed-adapter batch (M = 8 over 8
#            adapters, 4096x4096, r = 16) against one single-adapter call, per backend;
#            and bench.bench_dora --device cuda: DoRA forward + backward (adapter changed
#            every call, and with the norm kept) against LoRA at M = 1 and 512, 4096x4096,
#            r = 16, per backend (issue 15: DoRA <= 1.3x LoRA at M = 1)
#   summary  OUT_DIR/gpu_check.json (all results) and OUT_DIR/gpu_check.txt (the tables);
#            prints at most 40 lines
# Budget on an H100: about 6 minutes expected, the step limits sum to 9.2 (--quick:
# 4096x4096 at M = 1 and 64, DoRA at M = 1, no compile report, fewer Triton tests, no pip
# try for bitsandbytes; limits sum to 3.5 minutes).
# Exit 0 when every step passed, 1 when one failed, 3 when a requirement is missing, 2 on
# bad arguments.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: scripts/gpu_check.sh [--quick] [--skip-cuda] OUT_DIR | --dry-run [OUT_DIR]" >&2; exit 2; }
MODE=full SKIP_CUDA=0 OUT=""
for arg in "$@"; do
  case "$arg" in
    --quick) MODE=quick ;;
    --dry-run) MODE=dry-run ;;
    --skip-cuda) SKIP_CUDA=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) usage ;;
    *) [[ -z "$OUT" ]] || usage; OUT="$arg" ;;
  esac
done
if [[ -z "$OUT" ]]; then
  [[ "$MODE" == dry-run ]] || usage
  OUT="$(mktemp -d)"
fi
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
LOG="$OUT/gpu_check.log"
: >"$LOG"
exec 3>&1   # the terminal, for the one "missing" line from inside redirected steps
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || PY=python
NPROC="$(nproc 2>/dev/null || echo 4)"

# The commands of each step, shared by the real run and the dry run (so the dry run checks
# what the real run will execute).
GPU_TESTS=(tests/test_cuda_host.py tests/test_triton_matmul.py tests/test_triton_multi_lora.py
           tests/test_gpu_check.py)
BENCH_CODEC=(-m nf4lora.cli bench codec --device cuda --ops dequantize --out "$WORK/bench")
BENCH_MATMUL=(-m nf4lora.cli bench matmul --device cuda --ops lora train --out "$WORK/bench")
BENCH_MULTI=(-m bench.bench_multi_lora --device cuda --out "$WORK/bench")
BENCH_DORA=(-m bench.bench_dora --device cuda --out "$WORK/bench")
COMPILE_REPORT=(-m triton_kernels.compile_report --json --jobs "$NPROC")
# Limits (seconds), each step's expected time x 1.5-3. Measured on 2 cores here: the CPU
# extension builds in 23 s (its 6 files one after another, so about the same on 16
# cores; -j builds it beside the CUDA one), nvcc for one arch in 24 s; the compile report
# for both archs (330 variants) in minutes cold, 6 s from Triton's cache. Estimated for
# 16 cores: the compile report ~15 s (165 variants over 16 processes), the tests ~1 min
# (Triton JIT-compiles ~150 specializations over 8 workers; the 633 CUDA-backend tests
# take seconds), the bench ~2 min (~130 rows of ~30-layer rotations at ~0.5 s each,
# plus ~30 JIT compiles for the bench and guard shapes; the mixed-adapter rows: 4 rows of
# 60 calls of ~10-100 us, and a few Triton JIT compiles for their shape, +20 s allowed;
# nf4lora[cuda] no-triton adds a sixth of the matmul rows, +25 s; the DoRA rows: 9
# providers x 2 M, each ~40 forward + backward calls of ~0.1-2 ms, 18 one-layer models
# quantized on the GPU, and the Triton JIT compiles of 17 rows forward and 1 row
# backward (cached from the matmul run when its shapes match), ~30 s, +60 s allowed).
# Env (pip tries only for what is missing, LIMIT_PIP each) is not limited as a whole.
LIMIT_BUILD=110 LIMIT_COMPILE=40 LIMIT_TESTS=120 LIMIT_BENCH=275 LIMIT_PIP=60
QUICK_TESTS=()
if [[ "$MODE" == quick ]]; then
  BENCH_MATMUL+=(--shapes 4096x4096 --tokens 1 64)
  BENCH_DORA+=(--tokens 1 --reps 20)
  # The quick test set: the Triton sweeps over blocksizes, ranks, FP4 and LoRA/bias
  # combinations, and the codec sizes but 4097, left out (each is a batch of JIT
  # compiles); every kernel still runs, the CUDA backend's tests all run (no JIT).
  QUICK_TESTS=(-k "not blocksizes_and_row_layouts and not forward_ranks and not forward_fp4 and not lora_and_bias_on_and_off and not (codec_on_cuda and not 4097)")
  LIMIT_BUILD=75 LIMIT_COMPILE=0 LIMIT_TESTS=55 LIMIT_BENCH=80   # DoRA at M = 1: +20 s
fi

say() { echo "$*" | tee -a "$LOG"; }
missing() { echo "gpu_check: missing: $*" | tee -a "$LOG" >&3; exit 3; }

# pip_install PACKAGE...: one try at the package index; quick to fail without network.
pip_install() {
  [[ "$MODE" == dry-run ]] && return 1
  echo "gpu_check: pip install $* (limit ${LIMIT_PIP}s)" >>"$LOG"
  timeout -k 5 "$LIMIT_PIP" "$PY" -m pip install --disable-pip-version-check --no-input \
    --retries 0 --timeout 10 -q "$@" >>"$LOG" 2>&1
}

# has MODULE: python can import it.
has() { timeout -k 5 60 "$PY" -c "import $1" >/dev/null 2>&1; }

# arch_of "9.0" -> 90: the NF4LORA_CUDA_ARCHS / compile-report form of a capability.
arch_of() { local cap="$1"; echo "${cap%%.*}${cap##*.}"; }

find_nvcc() {
  local candidate
  for candidate in "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "$(command -v nvcc || true)" /usr/local/cuda/bin/nvcc; do
    [[ -n "$candidate" && -x "$candidate" ]] && { echo "$candidate"; return 0; }
  done
  return 1
}

# --- step: env ---------------------------------------------------------------------
# probe_env: writes $WORK/env.json (versions, the GPU) and prints torch's state: ok,
# cpu-build, no-device, or nothing when torch does not import. One python start: importing
# torch takes seconds.
probe_env() {
  NVCC="$NVCC" timeout -k 5 120 "$PY" - "$WORK/env.json" 2>>"$LOG" <<'PYEOF'
import importlib.metadata as md, json, os, subprocess, sys

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None

def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None

import torch
env = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
       "triton": version("triton"), "bitsandbytes": version("bitsandbytes"),
       "pytest_xdist": version("pytest-xdist"), "pytest_timeout": version("pytest-timeout"),
       "nvcc": os.environ.get("NVCC") or None, "cpus": os.cpu_count()}
if env["nvcc"]:
    env["nvcc_version"] = ((run(env["nvcc"], "--version") or "").splitlines() or [None])[-1]
env["nvidia_smi"] = run("nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                        "--format=csv,noheader")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
               sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
json.dump(env, open(sys.argv[1], "w"), indent=1)
print("cpu-build" if not torch.version.cuda else "ok" if torch.cuda.is_available() else "no-device")
PYEOF
}

# step_env: finds (or installs) what the run needs; sets NVCC and ARCH. The dry run only
# reports: it needs torch and pytest (to collect the tests), not a GPU.
step_env() {
  [[ "$MODE" == dry-run ]] || command -v nvidia-smi >/dev/null ||
    missing "nvidia-smi (no NVIDIA driver on this machine: is there a GPU?)"
  NVCC="$(find_nvcc || true)"
  local torch_state
  torch_state="$(probe_env)"
  if [[ -z "$torch_state" ]]; then
    pip_install torch || missing "torch (it does not import; pip could not install it: no package index?)"
    torch_state="$(probe_env)"
  fi
  if [[ "$MODE" != dry-run ]]; then
    if [[ "$torch_state" == cpu-build ]]; then
      { pip_install --force-reinstall torch && torch_state="$(probe_env)" && [[ "$torch_state" == ok ]]; } ||
        missing "a CUDA build of torch (this one is CPU-only: $(grep -o '"torch": "[^"]*"' "$WORK/env.json"); pip could not install another)"
    elif [[ "$torch_state" != ok ]]; then
      missing "a usable GPU: torch ($(grep -o '"torch": "[^"]*"' "$WORK/env.json")) says torch.cuda.is_available() is False"
    fi
    has triton || pip_install triton || missing "triton (not installed; pip could not install it)"
    has pytest || pip_install pytest || missing "pytest (not installed; pip could not install it)"
    { has setuptools && has pybind11; } || pip_install setuptools pybind11 ||
      missing "setuptools and pybind11 for the build (pip could not install them)"
    if [[ "$SKIP_CUDA" == 0 && -z "$NVCC" ]]; then
      missing "nvcc (the CUDA toolkit's compiler) for nf4lora._C_cuda: put it on PATH or set CUDA_HOME, or rerun with --skip-cuda for the Triton kernels alone"
    fi
    if [[ "$MODE" != quick ]] && ! has bitsandbytes; then   # optional: no pip try in --quick
      LIMIT_PIP=30 pip_install bitsandbytes && probe_env >/dev/null ||
        echo "gpu_check: bitsandbytes unavailable: its rows are skipped" >>"$LOG"
    fi
  fi
  local cap
  cap="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("capability") or "")' "$WORK/env.json")"
  ARCH="$(arch_of "${cap:-9.0}")"   # the dry run has no GPU: sm_90 stands in
  [[ "$ARCH" =~ ^[0-9]+$ ]] || { say "gpu_check: cannot read the GPU's compute capability ($cap)"; return 1; }
}

# --- steps: build, compile, tests, bench --------------------------------------------
step_build() {
  local skip=0
  [[ "$SKIP_CUDA" == 1 ]] && skip=1
  NF4LORA_CUDA_ARCHS="$ARCH" NF4LORA_SKIP_CUDA_BUILD="$skip" CUDA_HOME="${NVCC:+$(dirname "$(dirname "$NVCC")")}" \
    "$PY" setup.py build_ext --inplace -j "$NPROC" || return 1
  # The CUDA extension is optional in setup.py (a failed nvcc build does not stop it):
  # here it must import and find the GPU.
  "$PY" -c "
from nf4lora import backends
for name in (['triton'] if $skip else ['cuda', 'triton']):
    reason = backends.availability(name)
    print(f'backend {name}:', reason or 'available')
    assert reason is None, f'backend {name} unavailable: {reason}'"
}

step_compile() { "$PY" "${COMPILE_REPORT[@]}" --arch "$ARCH" >"$WORK/compile.json"; }

step_tests() {
  # With --skip-cuda the CUDA-backend tests skip themselves (no nf4lora._C_cuda).
  local args=(-m gpu -q -p no:cacheprovider -rfE --junitxml="$WORK/pytest-gpu.xml" "${QUICK_TESTS[@]}")
  has xdist && args+=(-n "$(( NPROC < 8 ? NPROC : 8 ))")
  has pytest_timeout && args+=(--timeout=120 --timeout-method=thread)
  # Compiled Triton kernels on CUDA tensors: the interpreter must be off in this process.
  env -u TRITON_INTERPRET "$PY" -m pytest "${args[@]}" "${GPU_TESTS[@]}"
}

step_bench() {
  # Two processes: the codec rows are saved even if the matmul run hits the limit.
  local status=0 codec=() matmul=()
  if [[ "$SKIP_CUDA" == 1 ]]; then   # every provider but nf4lora[cuda] (and its no-triton)
    codec=(--providers "nf4lora[triton]" bitsandbytes copy-bf16)
    matmul=(--providers "nf4lora[triton]" bitsandbytes dense-bf16)
  fi
  env -u TRITON_INTERPRET "$PY" "${BENCH_CODEC[@]}" "${codec[@]}" || status=1
  env -u TRITON_INTERPRET "$PY" "${BENCH_MATMUL[@]}" "${matmul[@]}" || status=1
  # every usable GPU backend (without nf4lora._C_cuda, --skip-cuda: triton alone)
  env -u TRITON_INTERPRET "$PY" "${BENCH_MULTI[@]}" || status=1
  env -u TRITON_INTERPRET "$PY" "${BENCH_DORA[@]}" || status=1
  return $status
}

# run_step NAME LIMIT FUNCTION: runs it under the limit, output to the log, one line out.
run_step() {
  local name="$1" limit="$2" fn="$3" start=$SECONDS rc
  if [[ "$limit" == 0 ]]; then
    echo "$name skipped 0 0" >>"$WORK/steps.txt"; say "step $name: skipped ($MODE)"; return 0
  fi
  echo "=== step $name (limit ${limit}s) ===" >>"$LOG"
  # A function cannot run under `timeout` directly: export what it needs, run it in bash.
  export -f "$fn" has arch_of find_nvcc say missing pip_install
  export PY ARCH NVCC WORK LOG MODE SKIP_CUDA NPROC LIMIT_PIP
  timeout -k 10 "$limit" bash -c "$(declare -p GPU_TESTS BENCH_CODEC BENCH_MATMUL BENCH_MULTI BENCH_DORA COMPILE_REPORT QUICK_TESTS 2>/dev/null); $fn" >>"$LOG" 2>&1
  rc=$?
  local seconds=$((SECONDS - start)) status=ok
  [[ $rc == 0 ]] || status=FAILED
  [[ $rc == 124 || $rc == 137 ]] && status="TIMED OUT"
  echo "$name ${status// /_} $seconds $limit" >>"$WORK/steps.txt"
  say "step $name: $status (${seconds}s of ${limit}s)"
  return $rc
}

summarize() {
  "$PY" - "$WORK" "$OUT" "$MODE" <<'PYEOF'
# Reads what the steps left in WORK, writes OUT/gpu_check.json and OUT/gpu_check.txt and
# prints the summary (at most 40 lines).
import json, os, sys, xml.etree.ElementTree as ET
work, out, mode = sys.argv[1:4]

def load(path):
    try:
        with open(os.path.join(work, path)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

steps = []
if os.path.exists(os.path.join(work, "steps.txt")):
    for line in open(os.path.join(work, "steps.txt")):
        name, status, seconds, limit = line.split()
        steps.append(dict(step=name, status=status.replace("_", " "), seconds=int(seconds),
                          limit=int(limit)))
env = load("env.json") or {}
tests = None
try:
    root = ET.parse(os.path.join(work, "pytest-gpu.xml")).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    count = lambda key: sum(int(s.get(key, 0)) for s in suites)
    failed = [f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
              for s in suites for case in s.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    tests = dict(collected=count("tests"), failed=count("failures"), errors=count("errors"),
                 skipped=count("skipped"), failing=failed)
    tests["passed"] = tests["collected"] - tests["failed"] - tests["errors"] - tests["skipped"]
except (OSError, ET.ParseError):
    pass
compile_rows = load("compile.json") or []
codec = load("bench/codec-gpu-latest.json") or {}
matmul = load("bench/matmul-gpu-latest.json") or {}
multi = load("bench/multi-lora-gpu-latest.json") or {}
dora = load("bench/dora-gpu-latest.json") or {}
bench_rows = codec.get("rows", []) + matmul.get("rows", [])
bandwidth = matmul.get("bandwidth") or codec.get("bandwidth") or {}
ok = bool(steps) and all(s["status"] in ("ok", "skipped") for s in steps) and mode != "dry-run"
result = dict(mode=mode, ok=ok, dry_run=mode == "dry-run", env=env, steps=steps, tests=tests,
              compile_report=compile_rows, bandwidth=bandwidth, bench_rows=bench_rows,
              multi_lora_rows=multi.get("rows", []), dora_rows=dora.get("rows", []),
              bench_notes=codec.get("notes", []) + matmul.get("notes", []) + multi.get("notes", [])
              + dora.get("notes", []))
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(result, f, indent=1, default=str)

def ms(row):
    return row.get("kernel_ms") or row.get("median_ms")

def cell(row):
    if row is None:
        return "-"
    share = row.get("pct_nominal_bw") or row.get("pct_read_bw")
    return f"{ms(row):.4f}" + (f" {share:3.0f}%" if share is not None else "")

SHORT = {"nf4lora[cuda]": "cuda", "nf4lora[cuda] out=": "cuda out=",
         "nf4lora[cuda] no-triton": "cuda no-triton",
         "nf4lora[triton]": "triton", "nf4lora[triton] out=": "triton out=",
         "nf4lora[triton] no-split-k": "triton no-split", "bitsandbytes": "bnb",
         "dense-bf16": "dense", "copy-bf16": "copy", "copy-bf16 out=": "copy out="}

def table(rows, ops, shapes=None):
    """Lines: one per (op, shape, M), a column per provider: kernel ms and % of HBM."""
    lines = []
    for op in ops:
        here = [r for r in rows if r["op"] == op and r.get("mode", "cold") == "cold"
                and (shapes is None or tuple(r["shape"]) in shapes)]
        providers = [p for p in SHORT if any(r["provider"] == p for r in here)]
        if not here:
            continue
        lines.append(f"{op:<10} {'shape':<10} {'M':>4}  " + "  ".join(f"{SHORT[p]:>15}" for p in providers))
        keys = list(dict.fromkeys((tuple(r["shape"]), r.get("tokens")) for r in here))
        for shape, m in keys:
            by = {r["provider"]: r for r in here if tuple(r["shape"]) == shape and r.get("tokens") == m}
            lines.append(f"{'':<10} {'x'.join(map(str, shape)):<10} {m if m is not None else '':>4}  "
                         + "  ".join(f"{cell(by.get(p)):>15}" for p in providers))
    return lines

def multi_lines(rows):
    """One line per backend: the mixed-adapter batch against its single-adapter call."""
    lines = []
    for backend in dict.fromkeys(r["backend"] for r in rows):
        single, mixed = (next((r for r in rows if r["backend"] == backend
                               and r["provider"].startswith(p)), None) for p in ("single", "nf4lora"))
        if single and mixed:
            kernel = (f", kernel {mixed['kernel_ms']:.4f} vs {single['kernel_ms']:.4f} ms"
                      if mixed.get("kernel_ms") and single.get("kernel_ms") else "")
            lines.append(f"multi-lora {backend}: {'x'.join(map(str, mixed['shape']))} M = "
                         f"{mixed['tokens']} over {mixed['adapters']} adapters, r = {mixed['rank']}: "
                         f"{mixed['median_ms']:.4f} ms vs single adapter {single['median_ms']:.4f} ms "
                         f"({mixed['x_vs_single']:.2f}x){kernel}")
    return lines

def dora_lines(rows):
    """One line per backend: LoRA's GPU time per forward + backward at each M (kernel ms
    where the profiler had it), and DoRA's and DoRA-with-the-norm-kept's ratio to it."""
    lines = []
    for backend in dict.fromkeys(r["backend"] for r in rows):
        cells = []
        for m in dict.fromkeys(r["tokens"] for r in rows if r["backend"] == backend):
            by = {r["provider"]: r for r in rows if r["backend"] == backend and r["tokens"] == m}
            lora = by.get("nf4lora LoRA")
            cell = f"M = {m}: LoRA " + (f"{ms(lora):.3f} ms" if lora else "-")
            for name, short in (("nf4lora DoRA", "DoRA"), ("nf4lora DoRA, kept norm", "kept norm")):
                row = by.get(name) or {}
                ratio = row.get("kernel_x_vs_lora") or row.get("x_vs_lora")
                cell += f", {short} " + (f"{ratio:.2f}x" if ratio is not None else "-")
            cells.append(cell)
        lines.append(f"dora {backend}: " + "; ".join(cells))
    return lines

head = []
if env:
    head.append(f"gpu_check ({mode}): {env.get('gpu', 'no GPU')} "
                f"(sm_{str(env.get('capability', '?')).replace('.', '')}, {env.get('sms', '?')} SMs), "
                f"torch {env.get('torch')} CUDA {env.get('torch_cuda')}, triton {env.get('triton')}, "
                f"bitsandbytes {env.get('bitsandbytes')}")
if steps:
    head.append("steps: " + " | ".join(f"{s['step']} {s['status']} {s['seconds']}s" for s in steps)
                + f" (total {sum(s['seconds'] for s in steps)}s)")
if tests:
    head.append(f"tests -m gpu: {tests['passed']} passed, {tests['failed']} failed, "
                f"{tests['errors']} errors, {tests['skipped']} skipped")
    head += [f"  FAILED {name}" for name in tests["failing"][:5]]
if compile_rows:
    spilled = [r for r in compile_rows if r["spills"]]
    worst = max(compile_rows, key=lambda r: r["registers"])
    head.append(f"compile report {compile_rows[0]['arch']}: {len(compile_rows)} variants, "
                f"{len(spilled)} spill, max {worst['registers']} registers ({worst['kernel']})")
if bandwidth:
    head.append(f"HBM probe: read {bandwidth.get('read_gbs', 0):.0f} GB/s, copy "
                f"{bandwidth.get('copy_gbs', 0):.0f} GB/s, nominal {bandwidth.get('nominal_gbs') or 0:.0f} GB/s; "
                "cells: GPU kernel ms per call, % of nominal HBM (else of the probe)")
# At most 32 lines, so that with the 5 step lines before it the output stays under 40.
head += multi_lines(result["multi_lora_rows"]) + dora_lines(result["dora_rows"])
body = table(bench_rows, ["dequantize"]) + table(bench_rows, ["lora", "train"], {(4096, 4096)})
notes = result["bench_notes"]
summary = head + body[:32 - len(head) - 3]
if notes:
    summary.append(f"{len(notes)} bench notes (skipped providers, failures): see gpu_check.txt")
summary.append(f"results: {out}/gpu_check.json, gpu_check.txt, gpu_check.log")
summary.append("gpu_check: " + ("dry run: summary step ok" if mode == "dry-run"
                                else "PASSED" if ok else "FAILED"))
full = head + table(bench_rows, ["dequantize", "lora", "train"]) + ["", "notes:"] + notes
with open(os.path.join(out, "gpu_check.txt"), "w") as f:
    f.write("\n".join(full) + "\n")
print("\n".join(summary[:32]))
PYEOF
}

# --- dry run -------------------------------------------------------------------------
dry_run() {
  local failed=0
  check() {  # check DESCRIPTION COMMAND...: runs it, one line
    if "${@:2}" >>"$LOG" 2>&1; then say "dry-run: ok      $1"; else say "dry-run: FAILED  $1"; failed=1; fi
  }
  check "script syntax (bash -n)" bash -n "$0"
  check "env probe (GPU parts reported, not required)" step_env
  check "arch_of 9.0 -> 90, 8.6 -> 86, 10.0 -> 100" \
    test "$(arch_of 9.0) $(arch_of 8.6) $(arch_of 10.0)" == "90 86 100"
  check "setup.py parses (build step: $PY setup.py build_ext --inplace)" "$PY" setup.py -q --name
  check "compile report command (${COMPILE_REPORT[*]} --arch $ARCH)" "$PY" "${COMPILE_REPORT[@]:0:2}" --help
  # The GPU tests: collected, not run (they skip without a GPU).
  local collected
  collected="$(env -u TRITON_INTERPRET "$PY" -m pytest --collect-only -q -m gpu -p no:cacheprovider \
    "${GPU_TESTS[@]}" 2>>"$LOG" | tee -a "$LOG" | grep -Eo '^[0-9]+(/[0-9]+)? tests? collected' | grep -Eo '^[0-9]+')"
  if [[ "${collected:-0}" -gt 0 ]]; then
    say "dry-run: ok      GPU tests collected: $collected (pytest -m gpu ${GPU_TESTS[*]})"
  else
    say "dry-run: FAILED  no GPU tests collected (pytest -m gpu ${GPU_TESTS[*]})"; failed=1
  fi
  check "bench codec accepts the GPU providers (${BENCH_CODEC[*]:2} --plan)" "$PY" "${BENCH_CODEC[@]}" --plan
  check "bench matmul accepts the GPU providers (${BENCH_MATMUL[*]:2} --plan)" "$PY" "${BENCH_MATMUL[@]}" --plan
  check "bench multi-lora accepts --device cuda (${BENCH_MULTI[*]:1} --plan)" "$PY" "${BENCH_MULTI[@]}" --plan
  check "bench dora accepts --device cuda (${BENCH_DORA[*]:1} --plan)" "$PY" "${BENCH_DORA[@]}" --plan
  grep '^plan:' "$LOG" | sed 's/^/  /'
  echo "dry-run skipped 0 0" >"$WORK/steps.txt"
  check "summary step writes gpu_check.json and gpu_check.txt" \
    bash -c "$(declare -f summarize); PY='$PY' WORK='$WORK' OUT='$OUT' MODE='$MODE'; summarize && test -s '$OUT/gpu_check.json' && test -s '$OUT/gpu_check.txt'"
  if [[ $failed == 0 ]]; then say "gpu_check --dry-run: ok ($OUT)"; else say "gpu_check --dry-run: FAILED (log: $LOG)"; fi
  return $failed
}

if [[ "$MODE" == dry-run ]]; then
  dry_run
  exit $?
fi

# --- the run ---------------------------------------------------------------------------
ARCH="" NVCC=""
START=$SECONDS
echo "=== step env ===" >>"$LOG"
step_env >>"$LOG" 2>&1 || { say "step env: FAILED (see $LOG)"; exit 1; }   # "missing" exits 3 itself
echo "env ok $((SECONDS - START)) 0" >"$WORK/steps.txt"
say "step env: ok (sm_$ARCH; $(( SECONDS - START ))s)"
if run_step build "$LIMIT_BUILD" step_build; then
  run_step compile "$LIMIT_COMPILE" step_compile
  run_step tests "$LIMIT_TESTS" step_tests
  run_step bench "$LIMIT_BENCH" step_bench
else
  say "gpu_check: the build failed, nothing else can run (see $LOG)"
fi
summarize
"$PY" -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))["ok"] else 1)' "$OUT/gpu_check.json"
