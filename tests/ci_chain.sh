#!/usr/bin/env bash
# A CI job's use of tltool: every command with --json, the next step reading the previous
# step's JSON (plain Python, no jq). Usage: tests/ci_chain.sh OUTPUT_ROOT [TLTOOL]
set -euo pipefail
root=${1:?output root}
tl=${2:-tltool}
here=$(cd "$(dirname "$0")/.." && pwd)
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval('d' + sys.argv[1]))" "$1"; }

src=$($tl pretrain "$here/configs/credit/pretrain.yaml" --json --set output.root="$root" \
      --set train.epochs=5 2>/dev/null)
[ "$(echo "$src" | field '["status"]')" = complete ]
src_run=$(echo "$src" | field '["run"]')

ft=$($tl freeze-finetune "$here/configs/credit/finetune.yaml" --json --set output.root="$root" \
     --set model.weights="$src_run" --set train.epochs=5 2>/dev/null)
ft_run=$(echo "$ft" | field '["run"]')
auroc=$(echo "$ft" | field '["metrics"]["test"]["auroc"]')
python3 -c "import sys; assert 0.5 < float(sys.argv[1]) <= 1, sys.argv[1]" "$auroc"

ev=$($tl evaluate "$ft_run" --json 2>/dev/null)
[ "$(echo "$ev" | field '["metrics"]["test"]["auroc"]')" = "$auroc" ]

pred=$($tl predict "$ft_run" "$here/configs/credit/new_applicants.csv" --json 2>/dev/null)
[ "$(echo "$pred" | field '["metrics"]["predict"]["rows"]')" -gt 0 ]

ex=$($tl export "$ft_run" --format torchscript --out "$root/served" --json 2>/dev/null)
[ "$(echo "$ex" | field '["export"]["parity"]["passed"]')" = True ]

listed=$($tl runs "$root" --json 2>/dev/null)
[ "$(echo "$listed" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" -ge 2 ]

# a failing step: exit code 2 and a JSON object saying why
set +e
bad=$($tl evaluate "$root/no/such/run" --json 2>/dev/null)
code=$?
set -e
[ "$code" = 2 ]
[ "$(echo "$bad" | field '["status"]')" = error ]
echo "ci chain ok: test auroc $auroc"
