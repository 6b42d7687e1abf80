#!/usr/bin/env bash
# List and manage training jobs through the admin API (/admin/jobs).
set -euo pipefail
# shellcheck source=scripts/_lib.sh
. "$(dirname "$0")/_lib.sh"

usage() {
    cat <<USAGE
usage: $PROG [-j] [--status STATUS]     list jobs, newest first
       $PROG ID                         one job (JSON): status, step, losses, checkpoints, error
       $PROG ID logs [N]                the last N lines (default 100) of the trainer's output
       $PROG ID events                  follow its events (raw server-sent events) until it ends
       $PROG ID cancel                  cancel a queued or running job (a running one saves last/ first)
       $PROG ID resume                  queue an interrupted or cancelled job again, from its last/
  -j, --json         print the list as JSON
      --status S     only jobs in status S (queued, running, succeeded, failed, cancelled, interrupted)
Environment: POCKETGPT_URL (default http://127.0.0.1:8000), POCKETGPT_ADMIN_TOKEN (required).
USAGE
}

as_json=0 status="" args=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        -j | --json) as_json=1; shift ;;
        --status) need_value "$1" "${2-}"; status="$2"; shift 2 ;;
        -?*) die "unknown option $1 (see $PROG -h)" ;;
        *) args+=("$1"); shift ;;
    esac
done
[ -n "${POCKETGPT_ADMIN_TOKEN:-}" ] || die "set POCKETGPT_ADMIN_TOKEN to the server's admin token"
TOKEN="$POCKETGPT_ADMIN_TOKEN"

if [ ${#args[@]} -eq 0 ]; then
    query=""
    [ -n "$status" ] && query="?status=$status"
    list="$(http GET "/admin/jobs$query" "$TOKEN")"
    if [ "$as_json" = 1 ]; then
        printf '%s\n' "$list" | json_get 'd'
        exit 0
    fi
    printf '%s\n' "$list" | "$PY" -c '
import json, sys
jobs = json.load(sys.stdin)["data"]
if not jobs:
    print("no jobs")
    sys.exit(0)
def fmt(v, spec=""):
    return "-" if v is None else format(v, spec)
print(
    "{:<18} {:<12} {:>12} {:>9}  {}".format("ID", "STATUS", "STEP", "VAL LOSS", "NAME"))
for j in jobs:
    step = "{}/{}".format(fmt(j.get("step")), fmt(j.get("total_steps")))
    loss = j.get("best_val_loss", j.get("val_loss"))
    print("{:<18} {:<12} {:>12} {:>9}  {}".format(j["id"], j["status"], step, fmt(loss, ".4f"), j.get("name") or ""))
'
    exit 0
fi

job_id="${args[0]}"
case "$job_id" in
    */* | *\?* | *%* | .*) die "not a job id: $job_id" ;;
esac
action="${args[1]:-show}"
case "$action" in
    show) http GET "/admin/jobs/$job_id" "$TOKEN" | json_get 'd' ;;
    logs)
        lines="${args[2]:-100}"
        [[ "$lines" =~ ^[0-9]+$ ]] || die "logs N: N must be a number"
        http GET "/admin/jobs/$job_id/logs?tail=$lines" "$TOKEN" ;;
    events) sse "/admin/jobs/$job_id/events" "$TOKEN" ;;
    cancel) http POST "/admin/jobs/$job_id/cancel" "$TOKEN" | json_get '{"id": d["id"], "status": d["status"], "cancel_requested": d["cancel_requested"]}' ;;
    resume) http POST "/admin/jobs/$job_id/resume" "$TOKEN" | json_get '{"id": d["id"], "status": d["status"]}' ;;
    *) die "unknown action '$action' (show, logs, events, cancel, resume)" ;;
esac
