#!/usr/bin/env bash
# The whole first GPU session, in one go, in under 9 minutes on one H100/H200 (all counted):
#
#   1  build set_kernels._C for this GPU's architecture only (in place: installs nothing)
#   2  set-kernels selftest (every backend, op, dtype and block size against float64)
#   3  the GPU tests (pytest -m gpu), most informative first, each test limited in time
#   4  compute-sanitizer: memcheck and racecheck on each cuda op, memcheck on the Triton ops
#   5  set-kernels bench --device cuda, on a grid sized to the time left
#   6  a summary (commit, device, driver, versions, pass/fail counts, headline E figures)
#
# Usage: benchmarks/gpu_session.sh [--dry-run] [OUTDIR]
#   OUTDIR   where everything goes (default benchmarks/results/<gpu-name>/session)
#   --dry-run  print each step, its time budget and its command; run and write nothing
# Environment: PYTHON (default python3), SET_KERNELS_COMMIT (the commit, when the tree has no
# .git, e.g. a copy sent to a GPU machine), SESSION_BUDGET_S (default 530).
#
# Order within step 3: the hand-written CUDA kernels (never run on a GPU before), then the masked
# Adam, stream, CUDA-graph and found_inf tests (quick), then the compiled Triton suite (autotuning
# makes it the longest), then every other test marked gpu.
#
# It runs the package from this working tree (PYTHONPATH), with the machine's own python, torch,
# triton and nvcc, and installs nothing. Every step runs under `timeout`; a step that fails or
# runs out of time is recorded and the session goes on. A step never starts with less time left
# than it needs to say something useful: later steps (and the summary) keep their minimum.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
DRY=0
OUT=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "gpu_session.sh: unknown option $arg" >&2; exit 2 ;;
    *) OUT=$arg ;;
  esac
done

TOTAL=${SESSION_BUDGET_S:-530}
START=$(date +%s)
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
GPU_NAME=${GPU_NAME:-no-gpu}
SLUG=$("$PY" -c 'import re, sys
s = re.sub(r"\((r|tm|c)\)", "", sys.argv[1].lower())
print(re.sub(r"[^a-z0-9.]+", "-", s).strip("-.") or "unknown-device")' "$GPU_NAME")
OUT=${OUT:-benchmarks/results/$SLUG/session}
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')
ARCH=${ARCH:-90}
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n1)
SANITIZER=${SANITIZER:-compute-sanitizer}
q() { printf '%q' "$1"; }
O=$(q "$OUT")

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export SET_KERNELS_CUDA_ARCHS=$ARCH   # the build below, and what tests/test_build.py expects of it
export SET_KERNELS_TEST_TIMEOUT=45    # per test (tests/conftest.py); each pytest run also has a timeout
export PYTHONUNBUFFERED=1
PYTEST="$PY -m pytest -v -rfE --tb=short -p no:cacheprovider"
TESTS_DONE="tests/test_cuda_backend.py tests/test_triton.py tests/test_build.py tests/test_masked_adam.py"
IGNORE=""
for f in $TESTS_DONE; do IGNORE="$IGNORE --ignore=$f"; done

# name | budget (s) | minimum to start (s) | command (a bash string; OUT is $O) -------------------
STEPS=(
  "0-env|10|5|{ date -u; nvidia-smi; nvcc --version; $PY -c 'import sys, torch, triton; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)'; } > $O/env.txt 2>&1"
  "1-build|90|30|SET_KERNELS_BUILD_CUDA=1 MAX_JOBS=\$(nproc) $PY setup.py build_ext --inplace > $O/build.log 2>&1; rc=\$?; $PY -m set_kernels info > $O/info.txt 2>&1; exit \$rc"
  "2-selftest|120|30|$PY -m set_kernels selftest --json $O/selftest.json > $O/selftest.txt 2>&1"
  "3a-tests-cuda|60|20|$PYTEST -m gpu tests/test_cuda_backend.py --junitxml=$O/tests-cuda.xml > $O/tests-cuda.log 2>&1"
  "3b-tests-adam-streams|30|15|$PYTEST -m gpu tests/test_build.py tests/test_masked_adam.py --junitxml=$O/tests-adam.xml > $O/tests-adam.log 2>&1"
  "3c-tests-triton|60|20|$PYTEST tests/test_triton.py --junitxml=$O/tests-triton.xml > $O/tests-triton.log 2>&1"
  "3d-tests-rest|40|15|$PYTEST -m gpu tests $IGNORE --junitxml=$O/tests-rest.xml > $O/tests-rest.log 2>&1"
  "4a-sanitizer-memcheck-cuda|25|15|sanitize memcheck cuda"
  "4b-sanitizer-racecheck-cuda|20|15|sanitize racecheck cuda"
  "4c-sanitizer-memcheck-triton|30|15|sanitize memcheck triton"
  "5a-bench-headline|35|30|$PY -m set_kernels bench --device cuda --quick --ops block_sparse_linear --block-sizes 64 --densities 0.1 0.5 --no-progress --out $O/bench-headline > $O/bench-headline.log 2>&1"
  "5b-bench-grid|0|90|$PY -m set_kernels bench --device cuda --quick --ops block_sparse_linear masked_adam_ --no-progress --out $O/bench > $O/bench.log 2>&1"
  "6-summary|10|10|summarize > $O/summary.md 2> $O/summary.err; cat $O/summary.md"
)
# (5b has no budget of its own: it gets whatever is left once the summary's share is set aside.)

describe() {
  case "$1" in
    4*) local tool=${1#*sanitizer-}; tool=${tool%-*}; local backend=${1##*-}
        echo "PYTORCH_NO_CUDA_MEMORY_CACHING=1 $SANITIZER --tool $tool --error-exitcode 86 $PY $O/sanitize_ops.py $backend > $O/sanitizer-$tool-$backend.log 2>&1 (each $backend op once, small shapes; 'sanitizer unavailable' when it refuses the device)" ;;
    6*) echo "summary of everything above -> $O/summary.md" ;;
    *) echo "$2" ;;
  esac
}

if [ "$DRY" = 1 ]; then
  echo "gpu_session.sh --dry-run: GPU '$GPU_NAME' (sm_$ARCH), output $OUT, python $PY"
  sum=0
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name budget minimum cmd <<< "$s"
    printf 'step %-30s budget %4s s: %s\n' "$name" "$budget" "$(describe "$name" "$cmd")"
    sum=$((sum + budget))
  done
  printf 'total budget %4s s (of %s s; 5b-bench-grid runs on what the steps before it leave)\n' "$sum" "$TOTAL"
  exit 0
fi

mkdir -p "$OUT" || exit 2
: > "$OUT/steps.tsv"
SANITIZER_OK=1

sanitize() {  # tool backend
  local log="$OUT/sanitizer-$1-$2.log"
  if [ "$SANITIZER_OK" != 1 ] || ! command -v "$SANITIZER" >/dev/null 2>&1; then
    echo "sanitizer unavailable (${SANITIZER_WHY:-compute-sanitizer not found})" > "$log"
    return 0
  fi
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$1" --error-exitcode 86 --print-limit 20 \
    "$PY" "$OUT/sanitize_ops.py" "$2" > "$log" 2>&1
  local rc=$?
  if [ $rc != 0 ] && [ $rc != 86 ] && ! grep -q "ERROR SUMMARY: [1-9]" "$log" \
      && grep -qiE "device not supported|not supported on this|error 999|unknown error|CUDA_ERROR_UNKNOWN|Unable to find injection" "$log"; then
    SANITIZER_OK=0
    SANITIZER_WHY="compute-sanitizer refused the device: $(grep -m1 -iE 'not supported|999|unknown error|injection' "$log")"
    echo "sanitizer unavailable ($SANITIZER_WHY)" >> "$log"
    return 0
  fi
  return $rc
}

summarize() {
  "$PY" - "$OUT" "$GPU_NAME" "${SET_KERNELS_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}" \
      "$(git status --porcelain 2>/dev/null | grep -qv '^??' && echo dirty || echo clean)" <<'PYEOF'
import glob, json, os, re, sys
out, gpu, commit, dirty = sys.argv[1:5]
def read(name):
    try:
        return open(os.path.join(out, name), errors="replace").read()
    except OSError:
        return ""
lines = ["# GPU session summary", "", f"- commit: `{commit}` ({dirty} tree)", f"- device: {gpu}"]
env = read("env.txt")
m = re.search(r"Driver Version: *(\S+) +CUDA Version: *(\S+)", env)
lines.append(f"- driver: {m.group(1)} (CUDA {m.group(2)})" if m else "- driver: unknown (no nvidia-smi output)")
m = re.search(r"^python (\S+) torch (\S+) cuda (\S+) triton (\S+)", env, re.M)
lines.append(f"- python {m.group(1)}, torch {m.group(2)} (CUDA {m.group(3)}), triton {m.group(4)}" if m
             else "- versions: unknown")
m = re.search(r"release (\S+),", env)
lines.append(f"- nvcc {m.group(1).rstrip(',')}" if m else "- nvcc: unknown")
lines += ["", "| step | budget s | limit s | wall s | exit | note |", "|---|---|---|---|---|---|"]
for row in read("steps.tsv").splitlines():
    name, budget, limit, wall, rc, note = (row.split("\t") + [""] * 6)[:6]
    lines.append(f"| {name} | {budget} | {limit} | {wall} | {rc} | {note} |")
lines += ["", "## Checks", ""]
try:
    st = json.load(open(os.path.join(out, "selftest.json")))
    c = st["counts"]
    lines.append(f"- selftest: {c['PASS']} passed, {c['FAIL']} failed, {c['skip']} skipped ({st['wall_s']:.0f} s)")
    for r in st["results"]:
        if r["status"] == "FAIL":
            lines.append(f"  - FAIL {r['backend']} {r['device']} {r['op']} {r['dtype']} b={r['block']}: "
                         f"error {r['error']} bound {r['bound']} {r['note']}")
    for name, why in st.get("unchecked", {}).items():
        lines.append(f"  - not checked: {name}: {why}")
except (OSError, ValueError, KeyError):
    rows = re.findall(r"\s(PASS|FAIL)\b", read("selftest.txt"))
    lines.append(f"- selftest: no JSON (cut short?); rows so far: {rows.count('PASS')} PASS, {rows.count('FAIL')} FAIL")
for log in sorted(glob.glob(os.path.join(out, "tests-*.log"))):
    text = open(log, errors="replace").read()
    counts = {k: len(re.findall(rf"::\S+ {k}\b", text)) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    final = re.findall(r"^=+ (.*) in [\d.]+s", text, re.M)
    lines.append(f"- {os.path.basename(log)[:-4]}: {counts['PASSED']} passed, {counts['FAILED']} failed, "
                 f"{counts['ERROR']} errors, {counts['SKIPPED']} skipped" + ("" if final else " (cut short)"))
    for f in re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)[:15]:
        lines.append(f"  - {f}")
for log in sorted(glob.glob(os.path.join(out, "sanitizer-*.log"))):
    text = open(log, errors="replace").read()
    m = re.search(r"ERROR SUMMARY: (\d+) error", text)
    state = ("sanitizer unavailable" if "sanitizer unavailable" in text
             else f"{m.group(1)} errors" if m else "no ERROR SUMMARY (cut short or crashed)")
    lines.append(f"- {os.path.basename(log)[:-4]}: {state}")
lines += ["", "## Headline E (density x dense time / sparse time; 1.0 = time scales with density)", ""]
found = False
for name in ("bench", "bench-headline"):
    for path in sorted(glob.glob(os.path.join(out, name, "*.json"))):
        doc = json.load(open(path))
        recs = [r for r in doc.get("records", []) if r.get("E") is not None]
        if not recs:
            continue
        found = True
        lines += [f"{name}/{os.path.basename(path)}:", "",
                  "| op | pass | dtype | block | density | backend | ms | dense ms | E |", "|---|---|---|---|---|---|---|---|---|"]
        for r in recs:
            lines.append(f"| {r['op']} | {r['pass']} | {r['dtype']} | {r['block']} | {r['density']:.3g} | {r['backend']} "
                         f"| {r['median_ms']:.3g} | {r['dense_ms']:.3g} | {r['E']:.2f} |")
        lines.append("")
if not found:
    lines.append("no benchmark results (see bench*.log)")
print("\n".join(lines))
PYEOF
}

cat > "$OUT/sanitize_ops.py" <<'PYEOF'
"""Each op of one backend once, on small shapes, for compute-sanitizer (gpu_session.sh step 4)."""
import sys

import torch

import set_kernels as sk
from set_kernels.selftest import triton_first_config

name = sys.argv[1]
dev = torch.device("cuda")
g = torch.Generator().manual_seed(0)
blocks = (16, 64, 128) if name == "cuda" else (1, 32)
with triton_first_config(name == "triton"):  # one config per kernel: no autotuning under the sanitizer
    for dtype in (torch.float32, torch.bfloat16):
        for b in blocks:
            rows, cols = (2 * b + 5, 3 * b - 7) if b > 1 else (37, 29)
            for M in (77, 2500):  # 2500 tokens: dW's split-K and its reduce pass
                layout = sk.BlockSparseLayout.random(rows, cols, b, 0.5, generator=g).to(dev)
                v = torch.randn(layout.nnz_blocks, b, b, generator=g).to(dev, dtype).requires_grad_()
                x = torch.randn(M, cols, generator=g).to(dev, dtype).requires_grad_()
                bias = torch.randn(rows, generator=g).to(dev, dtype).requires_grad_()
                y = sk.ops.block_sparse_linear(x, v, layout, bias, backend=name)
                y.backward(torch.randn(y.shape, generator=g).to(dev, dtype))
        shapes = [(33, 17), (5000,), (3,)]
        p = [torch.randn(s, generator=g).to(dev, dtype) for s in shapes]
        grads = [torch.randn(s, generator=g).to(dev, dtype) for s in shapes]
        m = [torch.zeros(s, device=dev) for s in shapes]
        v2 = [torch.zeros(s, device=dev) for s in shapes]
        masks = [torch.rand(shapes[0], generator=g).to(dev) < 0.5, None, torch.rand(shapes[2], generator=g).to(dev) < 0.5]
        sk.ops.masked_adam_(p, grads, m, v2, masks, step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                            weight_decay=0.01, decoupled_weight_decay=True, grad_scale=torch.ones(1, device=dev),
                            found_inf=torch.zeros(1, device=dev), backend=name)
torch.cuda.synchronize()
print(f"{name}: every op ran once")
PYEOF

# Run the steps ------------------------------------------------------------------------------
n=${#STEPS[@]}
for ((i = 0; i < n; i++)); do
  IFS='|' read -r name budget minimum cmd <<< "${STEPS[$i]}"
  now=$(date +%s)
  left=$((START + TOTAL - now))
  reserve=0  # the minimum of every later step that has a budget of its own
  for ((j = i + 1; j < n; j++)); do
    IFS='|' read -r _ b_j m_j _ <<< "${STEPS[$j]}"
    [ "$b_j" -gt 0 ] && reserve=$((reserve + m_j))
  done
  limit=$budget
  [ "$budget" = 0 ] && limit=$((left - reserve))
  [ "$limit" -gt $((left - reserve)) ] && limit=$((left - reserve))
  if [ "$name" != "6-summary" ] && [ "$limit" -lt "$minimum" ]; then
    printf '%s\t%s\t%s\t0\tskipped\tonly %s s left for it\n' "$name" "$budget" "$limit" "$limit" >> "$OUT/steps.tsv"
    echo "== $name: skipped (only $limit s left)"
    continue
  fi
  [ "$limit" -lt 5 ] && limit=5
  echo "== $name (limit $limit s)"
  t0=$(date +%s)
  case "$name" in
    4*) tool=${name#*sanitizer-}; tool=${tool%-*}; backend=${name##*-}
        export OUT PY SANITIZER
        timeout -k 10 "$limit" bash -c "$(declare -f sanitize); SANITIZER_OK=$SANITIZER_OK; sanitize $tool $backend"
        rc=$?
        grep -q "sanitizer unavailable" "$OUT/sanitizer-$tool-$backend.log" 2>/dev/null && SANITIZER_OK=0 ;;
    6*) summarize > "$OUT/summary.md" 2> "$OUT/summary.err"; rc=$? ;;
    *) timeout -k 10 "$limit" bash -c "$cmd"; rc=$? ;;
  esac
  wall=$(($(date +%s) - t0))
  note=""
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && note="ran out of time"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$budget" "$limit" "$wall" "$rc" "$note" >> "$OUT/steps.tsv"
  echo "   exit $rc after $wall s $note"
done
summarize > "$OUT/summary.md" 2>> "$OUT/summary.err"  # once more, with the summary step's own row
cat "$OUT/summary.md"
echo "gpu_session.sh: $(($(date +%s) - START)) s; everything is in $OUT"
