#!/usr/bin/env bash
# Start a training job (POST /admin/jobs) and follow its progress (GET /admin/jobs/ID/events, SSE).
set -euo pipefail
# shellcheck source=scripts/_lib.sh
. "$(dirname "$0")/_lib.sh"

usage() {
    cat <<USAGE
usage: $PROG [-f FILE]... [--preset NAME] [--steps N] [--time SECONDS] [--set KEY=VALUE]... [--name NAME]
             [--serve] [--no-follow] [-r] [DATA...]

Queue a training job on the server and print its progress until it ends; exits 0 if it succeeded.
  DATA                   stdlib (the default), an uploaded dataset id (ds-...), or a path under the
                         server's data root; several are trained on together
  -f, --file FILE        upload FILE first (POST /admin/datasets) and train on it (repeatable)
      --preset NAME      model shape: tiny, small (default) or gpt2
      --steps N          optimizer steps (max_steps)
      --time SECONDS     wall-time cap (max_time)
      --set KEY=VALUE    any other job field, e.g. batch_size=32, lr=3e-4, eval_every=50,
                         model.n_layer=2 (VALUE is read as JSON when it parses, else as a string)
      --name NAME        a label for the job
      --serve            hot-load the job's best checkpoint into the server when it succeeds
      --no-follow        print the queued job (JSON) and exit
  -r, --raw              print the raw event stream instead of progress lines
Ctrl-C stops following, not the job: cancel it with scripts/jobs.sh ID cancel.
Environment: POCKETGPT_URL (default http://127.0.0.1:8000), POCKETGPT_ADMIN_TOKEN (required).
Example: $PROG -f my_corpus.txt --preset tiny --steps 300 --serve
USAGE
}

fields=() files=() follow=1 raw=0
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        -f | --file) need_value "$1" "${2-}"; [ -f "$2" ] || die "no such file: $2"; files+=("$2"); shift 2 ;;
        --preset) need_value "$1" "${2-}"; fields+=("S:preset=$2"); shift 2 ;;
        --steps) need_value "$1" "${2-}"; fields+=("J:max_steps=$2"); shift 2 ;;
        --time) need_value "$1" "${2-}"; fields+=("J:max_time=$2"); shift 2 ;;
        --set) need_value "$1" "${2-}"; [[ "$2" == *=* ]] || die "--set needs KEY=VALUE"; fields+=("J:$2"); shift 2 ;;
        --name) need_value "$1" "${2-}"; fields+=("S:name=$2"); shift 2 ;;
        --serve) fields+=("J:serve_when_done=true"); shift ;;
        --no-follow) follow=0; shift ;;
        -r | --raw) raw=1; shift ;;
        --) shift; for d in "$@"; do fields+=("S:data=$d"); done; break ;;
        -?*) die "unknown option $1 (see $PROG -h)" ;;
        *) fields+=("S:data=$1"); shift ;;
    esac
done
[ -n "${POCKETGPT_ADMIN_TOKEN:-}" ] || die "set POCKETGPT_ADMIN_TOKEN to the server's admin token"
TOKEN="$POCKETGPT_ADMIN_TOKEN"

for file in ${files[@]+"${files[@]}"}; do
    dataset="$(http POST /admin/datasets "$TOKEN" -F "file=@$file")"
    id="$(printf '%s\n' "$dataset" | json_get 'd["id"]')"
    echo "uploaded $file as dataset $id" >&2
    fields+=("S:data=$id")
done

body="$("$PY" -c '
import json, sys
out, model, data = {}, {}, []
for arg in sys.argv[1:]:
    kind, _, rest = arg.partition(":")
    key, _, value = rest.partition("=")
    if kind == "J":
        try:
            value = json.loads(value)
        except ValueError:
            pass  # a plain string
    if key == "data":
        data.append(value)
    elif key.startswith("model."):
        model[key[len("model."):]] = value
    else:
        out[key] = value
out["data"] = data or ["stdlib"]
if model:
    out["model"] = model
print(json.dumps(out))
' ${fields[@]+"${fields[@]}"})"

job="$(http POST /admin/jobs "$TOKEN" -H 'Content-Type: application/json' --data-binary "$body")"
job_id="$(printf '%s\n' "$job" | json_get 'd["id"]')"
if [ "$follow" = 0 ]; then
    printf '%s\n' "$job" | json_get 'd'
    exit 0
fi
echo "job $job_id queued; following $POCKETGPT_URL/admin/jobs/$job_id/events" >&2
if [ "$raw" = 1 ]; then
    sse "/admin/jobs/$job_id/events" "$TOKEN"
    status="$(http GET "/admin/jobs/$job_id" "$TOKEN" | json_get 'd["status"]')"
    [ "$status" = succeeded ]
    exit
fi
# Progress lines from the job's metrics records; the final `status` event decides the exit code.
sse "/admin/jobs/$job_id/events" "$TOKEN" | "$PY" -u -c '
import json, sys

def eta(seconds):
    seconds = int(seconds or 0)
    return f"{seconds // 60}m{seconds % 60:02d}s"

def show(event, d):
    if event == "start":
        print("started: {:,} parameters, {:,} tokens/step, {} steps".format(
            d.get("params") or 0, d.get("tokens_per_step") or 0, d.get("total_steps")))
    elif event == "train":
        print("step {}/{} | loss {:.4f} | lr {:.2e} | {:,.0f} tok/s | eta {}".format(
            d.get("step"), d.get("total_steps"), d.get("loss") or 0, d.get("lr") or 0,
            d.get("tokens_per_s") or 0, eta(d.get("eta_s"))))
    elif event == "eval":
        print("step {}: val loss {:.4f} | {:.3f} bits/byte{}".format(
            d.get("step"), d.get("val_loss") or 0, d.get("val_bpb") or 0, " (best)" if d.get("best") else ""))
        if d.get("sample"):
            print("  sample: " + repr(d["sample"][:200]))
    elif event == "end":
        print("{} at step {} ({}); best val loss {}".format(
            d.get("status"), d.get("step"), d.get("reason"), d.get("best_val_loss")))
    elif event == "error":
        print("error: " + str(d.get("message")))

event, data, final = "message", [], None
for line in sys.stdin:
    line = line.rstrip("\r\n")
    if line.startswith(":"):
        continue
    if not line:
        if data:
            d = json.loads("\n".join(data))
            if event == "status":
                final = d
                break
            show(event, d)
            sys.stdout.flush()
        event, data = "message", []
        continue
    field, _, value = line.partition(":")
    value = value[1:] if value.startswith(" ") else value
    if field == "event":
        event = value
    elif field == "data":
        data.append(value)
    elif field not in ("id", "retry"):
        sys.stderr.write(line + "\n")  # not an event stream: an error body
if final is None:
    sys.exit("the event stream ended before the job did")
status = final.get("status")
print("job {}: {}".format(final.get("id"), status))
if final.get("error"):
    print("error: " + str(final["error"]), file=sys.stderr)
if status == "succeeded":
    best = (final.get("checkpoints") or {}).get("best")
    if best:
        print("best checkpoint: " + str(best))
    if final.get("served_checkpoint"):
        print("now serving: " + str(final["served_checkpoint"]))
    if final.get("serve_error"):
        print("could not serve it: " + str(final["serve_error"]), file=sys.stderr)
sys.exit(0 if status == "succeeded" else 1)
'
