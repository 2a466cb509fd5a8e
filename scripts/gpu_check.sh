#!/usr/bin/env bash
# One-call GPU validation: install, GPU parity tests, the headline sweep and the 1M-row memory run.
#
#   bash scripts/gpu_check.sh OUTDIR            # on a GPU machine with a CUDA build of torch (no network)
#   bash scripts/gpu_check.sh --dry-run OUTDIR  # the same steps on a CPU at tiny sizes (CI runs this)
#
# Writes into OUTDIR: tests.xml (JUnit) and tests.log, the sweep's results.jsonl / results.csv /
# meta.json / plots (fused vs eager vs torch.compile vs Inf-CL when installed, each beside a
# same-shape matmul; fwd, bwd, fwd+bwd; N = 16k/32k/64k at D = 128/384/768; M = N = 1M at D = 512
# with its peak memory), and check.json (each step's status and seconds). Every step has a time
# limit so the whole run stays under 9 minutes; a sweep cut short keeps what it measured.
# PYTHON selects the interpreter (default: python3).
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
if [ $# -ne 1 ]; then
    echo "usage: bash scripts/gpu_check.sh [--dry-run] OUTDIR" >&2
    exit 2
fi
out=$1
mkdir -p "$out"
py=${PYTHON:-python3}
if [ "$dry" -eq 1 ]; then
    plan=gpu-check-dry device=cpu tests=(tests/test_parity.py -k "ragged or two_views or large or fp16_gradient")
    export TRITON_INTERPRET=1
else
    plan=gpu-check device=cuda tests=(tests/test_parity.py tests/test_properties.py tests/test_api.py tests/test_compile.py)
    if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: no CUDA device visible to $py (use --dry-run on a CPU)" >&2
        exit 2
    fi
fi
steps=()
status=0
step() {  # step NAME LIMIT_SECONDS COMMAND...: run it, record status and time
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@"
    local rc=$?
    steps+=("{\"step\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - start))}")
    [ "$rc" -eq 0 ] || status=1
    return "$rc"
}
step install 150 "$py" -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
step tests 150 "$py" -m pytest -q -p no:cacheprovider --junitxml="$out/tests.xml" "${tests[@]}" \
    > "$out/tests.log" 2>&1
tail -n 3 "$out/tests.log"
# a sweep stopped by its limit has results.jsonl only: then write the CSV, meta.json and plots from it
step sweep 240 "$py" -m benchmarks.sweep --plan "$plan" --device "$device" --out "$out" --resume ||
    step report 60 "$py" -m benchmarks.sweep --plan --device "$device" --out "$out" --resume
(IFS=,; echo "{\"dry_run\": $([ "$dry" -eq 1 ] && echo true || echo false), \"steps\": [${steps[*]}]}") \
    > "$out/check.json"
echo "wrote $out (check.json: $([ "$status" -eq 0 ] && echo "every step passed" || echo "a step FAILED"))"
exit "$status"
