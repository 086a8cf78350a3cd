#!/usr/bin/env bash
# benchmarks/tput_h100.sh with the GPU's SM clock, power and clock-event reasons sampled every 50 ms
# (nvidia-smi) beside it; prints those over each timed run's window (its report's write time minus
# its seconds) against the card's maximum clock and power limit: whether a 1000 x 128/128 run is
# held back by the power cap (then hiding host work behind the device cannot pay: the device's
# work takes the same energy). Same variables as tput_h100.sh. Logs in $OUT (default /tmp/jaxllm-clocks).
#   OUT=$OUT VARIANTS=default bash benchmarks/tput_clocks.sh
OUT=${OUT:-/tmp/jaxllm-clocks}; mkdir -p "$OUT"
q=timestamp,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,clocks_event_reasons.active
nvidia-smi --query-gpu=$q --format=csv,noheader,nounits -lms 50 > "$OUT/smi.csv" 2> "$OUT/smi.err" &
smi=$!
OUT=$OUT bash "$(dirname "$0")/tput_h100.sh"
kill $smi
python - "$OUT" <<'PY'
import csv, datetime, json, os, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = []
for r in csv.reader(open(out / "smi.csv")):
    try:
        t = datetime.datetime.strptime(r[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
        rows.append((t, float(r[1]), float(r[2]), float(r[3]), float(r[4]), float(r[5]), int(r[6].strip(), 16)))
    except (ValueError, IndexError):
        continue
print(f"{len(rows)} samples; {'run':<14} {'SM MHz mean/min':>16} {'max':>5} {'W mean/max':>11} {'limit':>6} {'degC':>5}  reasons (share of samples)")
names = {0x1: "idle", 0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake"}
for p in sorted(out.glob("*.json")):
    r = json.loads(p.read_text())
    end = os.path.getmtime(p)
    win = [x for x in rows if end - r["seconds"] - 0.3 <= x[0] <= end - 0.1]
    if not win:
        print(f"{p.stem:<14} no samples in its window"); continue
    n = len(win)
    reasons = {v: sum(1 for x in win if x[6] & k) / n for k, v in names.items()}
    print(f"{p.stem:<14} {sum(x[1] for x in win) / n:>9.0f}/{min(x[1] for x in win):<6.0f} {win[0][2]:>5.0f} "
          f"{sum(x[3] for x in win) / n:>5.0f}/{max(x[3] for x in win):<5.0f} {win[0][4]:>6.0f} {max(x[5] for x in win):>5.0f}  "
          + " ".join(f"{k} {v:.0%}" for k, v in reasons.items() if v))
PY
