#!/usr/bin/env bash
# Hot-load a checkpoint into the running server (POST /admin/model), or list the checkpoints.
set -euo pipefail
# shellcheck source=scripts/_lib.sh
. "$(dirname "$0")/_lib.sh"

usage() {
    cat <<USAGE
usage: $PROG CHECKPOINT     serve CHECKPOINT from now on (the old model finishes its requests first)
       $PROG [-j]           list the checkpoints under the server's checkpoint root (* = being served)

CHECKPOINT is a name from the list (e.g. starter/best, job-0123456789ab/best) or a job id (its best
checkpoint). If it cannot be loaded the current model keeps serving and this exits 1.
  -j, --json     print the list as JSON
Environment: POCKETGPT_URL (default http://127.0.0.1:8000), POCKETGPT_ADMIN_TOKEN (required).
USAGE
}

as_json=0 checkpoint=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        -j | --json) as_json=1; shift ;;
        -?*) die "unknown option $1 (see $PROG -h)" ;;
        *) [ -z "$checkpoint" ] || die "expected one CHECKPOINT"; checkpoint="$1"; shift ;;
    esac
done
[ -n "${POCKETGPT_ADMIN_TOKEN:-}" ] || die "set POCKETGPT_ADMIN_TOKEN to the server's admin token"
TOKEN="$POCKETGPT_ADMIN_TOKEN"

if [ -n "$checkpoint" ]; then
    body="$(json_obj checkpoint s "$checkpoint")"
    http POST /admin/model "$TOKEN" -H 'Content-Type: application/json' --data-binary "$body" | json_get 'd'
    exit 0
fi
list="$(http GET /admin/checkpoints "$TOKEN")"
if [ "$as_json" = 1 ]; then
    printf '%s\n' "$list" | json_get 'd'
    exit 0
fi
printf '%s\n' "$list" | "$PY" -c '
import json, sys
items = json.load(sys.stdin)["data"]
if not items:
    print("no checkpoints")
    sys.exit(0)
def fmt(v, spec=""):
    return "-" if v is None else format(v, spec)
print("  {:<40} {:>8} {:>9} {:>11}".format("NAME", "STEP", "VAL LOSS", "PARAMS"))
for c in items:
    mark = "*" if c.get("serving") else " "
    print("{} {:<40} {:>8} {:>9} {:>11}".format(
        mark, c["name"], fmt(c.get("step")), fmt(c.get("val_loss"), ".4f"), fmt(c.get("params"), ",")))
'
