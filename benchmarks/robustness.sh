#!/bin/sh
# The robustness table of docs/benchmarks.md (issue #11): fmnist-fleet (BENCHMARK.md, 50
# devices) on the virtual clock, FedBuff, 20 simulated seconds each (the stop at 0.80 is
# overridden so every run has the same budget), the update-norm bounds off
# (--update-norm-factor 0) so only the robust rule defends. One run at a time, niced.
# Usage: benchmarks/robustness.sh OUT_DIR   (then: python benchmarks/robustness.py OUT_DIR)
set -u
OUT=${1:?usage: benchmarks/robustness.sh OUT_DIR}
mkdir -p "$OUT"
run() {
  name=$1; shift
  echo "=== $name start $(date -u +%H:%M:%S) load: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/progress.log"
  nice -n 5 fedmq bench --virtual --strategy fedbuff --target 0.99 --max-seconds 20 \
    --update-norm-factor 0 --out-dir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name end $(date -u +%H:%M:%S) load: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/progress.log"
}
run clean-mean
run scale-mean --byzantine 0.1 --attack scale
run scale-norm_bounded --byzantine 0.1 --attack scale --robust norm_bounded
run scale-median --byzantine 0.1 --attack scale --robust median
run scale-trimmed_mean --byzantine 0.1 --attack scale --robust trimmed_mean
run clean-norm_bounded --robust norm_bounded
run clean-median --robust median
run clean-trimmed_mean --robust trimmed_mean
run sign-flip-mean --byzantine 0.1 --attack sign-flip
run sign-flip-trimmed_mean --byzantine 0.1 --attack sign-flip --robust trimmed_mean
run noise-mean --byzantine 0.1 --attack noise
run noise-trimmed_mean --byzantine 0.1 --attack noise --robust trimmed_mean
run label-flip-mean --byzantine 0.1 --attack label-flip
run label-flip-trimmed_mean --byzantine 0.1 --attack label-flip --robust trimmed_mean
run sign-flip-median --byzantine 0.1 --attack sign-flip --robust median
run sign-flip-norm_bounded --byzantine 0.1 --attack sign-flip --robust norm_bounded
