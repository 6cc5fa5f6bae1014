#!/usr/bin/env bash
# The default path of a new user, timed: the README's Quick tour, then `cstar compress` with no
# option beyond checkpoint, data, ratio and output, on MNIST and on CIFAR-10 (ResNet-18 width 16).
#
#   CSTAR_DATA=data CIFAR_ROOT=.cache/data bash benchmarks/defaults_acceptance.sh OUT_DIR
#
# Steps (each skipped when its output exists, so a killed run continues where it stopped):
#   1. the Quick tour block of README.md, verbatim (writes runs/mnist/model)       ~10 min
#   2. cstar compress --checkpoint runs/mnist/model --data mnist --ratio 8         ~30 min
#   3. cstar train: dense ResNet-18 width 16 on CIFAR-10 (N-FGSM, 10 epochs)       ~40 min
#   4. cstar compress --checkpoint <3> --data cifar10 --ratio 8                    ~25 min
# Each step's wall time (and the host's steal share of the CPU meanwhile) goes to OUT_DIR/times.jsonl; run it alone (2 cores: any other job
# running beside it makes the times meaningless). CIFAR_ROOT holds cifar-10-batches-py
# (the official CIFAR-10, or a copy rebuilt into its layout).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 1 ] || [ -z "${CSTAR_DATA:-}" ] || [ -z "${CIFAR_ROOT:-}" ]; then
  echo "usage: CSTAR_DATA=DIR CIFAR_ROOT=DIR bash benchmarks/defaults_acceptance.sh OUT_DIR" >&2
  exit 2
fi
out="$1"; mkdir -p "$out"

timed() {  # timed NAME COMMAND...: run, append {"step", "seconds", "exit", "load_after", "steal"} to times.jsonl
  local name="$1"; shift
  local t0; t0=$(date +%s.%N)
  local cpu0; cpu0=$(head -1 /proc/stat)
  local rc=0; "$@" || rc=$?
  python - "$out/times.jsonl" "$name" "$t0" "$rc" "$cpu0" <<'EOF'
import json, sys, time
path, name, t0, rc, cpu0 = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
# steal: the share of this VM's CPU time the host gave to others during the step (a busy host slows every step)
before, after = ([int(v) for v in line.split()[1:9]] for line in (cpu0, open("/proc/stat").readline()))
spent = [b - a for a, b in zip(before, after)]
with open(path, "a") as f:
    f.write(json.dumps({"step": name, "seconds": round(time.time() - t0, 1), "exit": rc,
                        "load_after": open("/proc/loadavg").read().split()[:3],
                        "steal": round(spent[7] / max(1, sum(spent)), 3)}) + "\n")
EOF
  return "$rc"
}

if [ ! -e runs/mnist/model ]; then
  sed -n '/^## Quick tour/,/^## /p' README.md | sed -n '/^```python/,/^```/p' | sed '1d;$d' > "$out/quick_tour.py"
  timed quick_tour python "$out/quick_tour.py" 2>&1 | tee "$out/quick_tour.log"
fi
if [ ! -e "$out/mnist-8x/results.json" ]; then
  resume=(); [ -e "$out/mnist-8x/config.yaml" ] && resume=(--resume)
  timed compress_mnist cstar compress --checkpoint runs/mnist/model --data mnist --ratio 8 \
    --out "$out/mnist-8x" "${resume[@]}" 2>&1 | tee -a "$out/compress_mnist.log"
fi
if [ ! -e "$out/c10-dense/model" ]; then
  resume=(); [ -e "$out/c10-dense/config.yaml" ] && resume=(--resume)
  timed train_cifar10 cstar train --model resnet18 --width 16 --data cifar10 --root "$CIFAR_ROOT" \
    --attack nfgsm --epochs 10 --optimizer sgd --lr 0.2 --weight-decay 5e-4 --schedule onecycle \
    --channels-last --eval-attacks clean,pgd20 --eval-n 2000 --out "$out/c10-dense" "${resume[@]}" \
    2>&1 | tee -a "$out/train_cifar10.log"
fi
if [ ! -e "$out/c10-8x/results.json" ]; then
  resume=(); [ -e "$out/c10-8x/config.yaml" ] && resume=(--resume)
  timed compress_cifar10 cstar compress --checkpoint "$out/c10-dense/model" --data cifar10 \
    --root "$CIFAR_ROOT" --ratio 8 --out "$out/c10-8x" "${resume[@]}" 2>&1 | tee -a "$out/compress_cifar10.log"
fi
cat "$out/times.jsonl"
