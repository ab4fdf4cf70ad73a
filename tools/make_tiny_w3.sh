#!/usr/bin/env bash
# Rebuilds models/tiny-shapes-w3, the bundled default: models/tiny-shapes
# quantized with MBQ at W3 g128, calibrated on 128 samples of
# `mbq shapes --seed 2000` (the seed reserved for calibration). Run from
# the repository root after models/tiny-shapes changes:
#
#     bash tools/make_tiny_w3.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin mbq >&2
MBQ="$PWD/target/release/mbq"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$MBQ" shapes --seed 2000 --count 40 --out "$WORK/calib"
"$MBQ" quantize --method mbq --w-bit 3 --group-size 128 --n-samples 128 --seed 42 \
  --calib "$WORK/calib/questions.jsonl" --image-folder "$WORK/calib" \
  --model models/tiny-shapes --out "$WORK/tiny-shapes-w3"
# The report names the temporary calibration folder: say what it was.
python3 - "$WORK/tiny-shapes-w3/calibration_report.json" <<'PY'
import json, sys
p = sys.argv[1]
r = json.load(open(p))
r["calib"] = "mbq shapes --seed 2000 --count 40: questions.jsonl"
r["image_folder"] = "mbq shapes --seed 2000 --count 40"
r["model"] = "models/tiny-shapes"
json.dump(r, open(p, "w"), indent=2)
open(p, "a").write("\n")
PY
rm -rf models/tiny-shapes-w3.old
[ -d models/tiny-shapes-w3 ] && mv models/tiny-shapes-w3 models/tiny-shapes-w3.old
mv "$WORK/tiny-shapes-w3" models/tiny-shapes-w3
rm -rf models/tiny-shapes-w3.old
echo "models/tiny-shapes-w3: MBQ W3 g128 of models/tiny-shapes" >&2
