#!/bin/bash
# OpenMP's waiting policy against load (docs/BENCHMARKS.md section 14): the demo and the
# Qwen3-30B-A3B-shaped synthetic model (2 layers, 4-bit), pp64 and tg, beside 0, 1 and 2
# busy loops, with libgomp's default spinning ("spin": OMP_WAIT_POLICY set empty, which
# moerun leaves alone and libgomp ignores), passive waiting (moerun's default) and one
# thread. One JSON line per run appended to OUT.
# usage: scripts/bench_wait_policy.sh OUT.jsonl [rounds]   (MOERUN=path/to/moerun picks the binary)
OUT=$1; ROUNDS=${2:-1}
M=${MOERUN:-moerun}
run() { # label env-assignment bench-args...
  local label=$1 envs=$2; shift 2
  local res
  res=$(env "$envs" "$M" bench "$@" -o json 2>/dev/null | python3 -c "import json,sys; d=json.load(sys.stdin); print(json.dumps({r['test']: round(r['t_s_mean'], 1) for r in d['rows']}))")
  echo "{\"label\": \"$label\", \"busy\": $BUSY, \"model\": \"$MODEL\", \"load\": $(cut -d' ' -f1 /proc/loadavg), \"res\": $res}" | tee -a "$OUT"
}
for BUSY in 0 1 2; do
  pids=""
  for _ in $(seq 1 $BUSY); do (while :; do :; done) & pids="$pids $!"; done
  sleep 2
  for _ in $(seq 1 "$ROUNDS"); do
    for policy in "spin|OMP_WAIT_POLICY=" "passive|OMP_WAIT_POLICY=PASSIVE" "threads1|OMP_WAIT_POLICY=PASSIVE"; do
      label=${policy%%|*}; envs=${policy#*|}; extra=()
      [ "$label" = threads1 ] && extra=(--threads 1)
      MODEL=demo run "$label" "$envs" demo --bits 4 --device cpu -p 64 -n 64 -r 3 "${extra[@]}"
      MODEL=qwen3 run "$label" "$envs" --synthetic qwen3-30b-a3b --layers 2 --bits 4 -p 64 -n 32 -r 2 --device cpu "${extra[@]}"
    done
  done
  [ -n "$pids" ] && kill $pids
done
