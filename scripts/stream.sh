#!/usr/bin/env bash
# Stream text from POST /v1/generate with "stream": true (server-sent events, printed as they arrive).
set -euo pipefail
# shellcheck source=scripts/_lib.sh
. "$(dirname "$0")/_lib.sh"

usage() {
    cat <<USAGE
usage: $PROG [-n MAX_NEW_TOKENS] [-t TEMPERATURE] [-k TOP_K] [-p TOP_P] [-s SEED] [--stop STR] [-r] PROMPT

Continue PROMPT ('-' reads it from stdin), printing each token as the server sends it.
  -n, --max-new-tokens N   tokens to generate at most (default 200)
  -t, --temperature X      0 = greedy (default 0.7)
  -k, --top-k N            keep the N most likely tokens (default: off)
  -p, --top-p X            nucleus sampling mass (default: off)
  -s, --seed N             seed for a reproducible sample
      --stop STR           stop string (repeatable, up to 4)
  -r, --raw                print the raw event stream (event: token / done / error) instead of the text
The summary (tokens, finish reason, tokens/s) goes to stderr. Exits 1 on an HTTP error or an error event.
Environment: POCKETGPT_URL (default http://127.0.0.1:8000), POCKETGPT_API_KEY.
Example: $PROG -t 0.3 'class Stack:'
USAGE
}

max_new=200 temperature=0.7 top_k="" top_p="" seed="" raw=0 prompt="" have_prompt=0 stops=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        -n | --max-new-tokens) need_value "$1" "${2-}"; max_new="$2"; shift 2 ;;
        -t | --temperature) need_value "$1" "${2-}"; temperature="$2"; shift 2 ;;
        -k | --top-k) need_value "$1" "${2-}"; top_k="$2"; shift 2 ;;
        -p | --top-p) need_value "$1" "${2-}"; top_p="$2"; shift 2 ;;
        -s | --seed) need_value "$1" "${2-}"; seed="$2"; shift 2 ;;
        --stop) need_value "$1" "${2-}"; stops+=("$2"); shift 2 ;;
        -r | --raw) raw=1; shift ;;
        --) shift; [ $# -eq 1 ] || die "expected one PROMPT after --"; prompt="$1"; have_prompt=1; shift ;;
        -?*) [ "$1" = - ] && { prompt="$1"; have_prompt=1; shift; continue; }; die "unknown option $1 (see $PROG -h)" ;;
        *) [ "$have_prompt" = 0 ] || die "expected one PROMPT (quote it)"; prompt="$1"; have_prompt=1; shift ;;
    esac
done
[ "$have_prompt" = 1 ] || { usage >&2; exit 2; }
[ "$prompt" = - ] && prompt="$(cat)"

stop_json=""
[ ${#stops[@]} -gt 0 ] && stop_json="$("$PY" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "${stops[@]}")"
body="$(json_obj prompt s "$prompt" max_new_tokens n "$max_new" temperature n "$temperature" \
    top_k n "$top_k" top_p n "$top_p" seed n "$seed" stop j "$stop_json" stream b true)"

if [ "$raw" = 1 ]; then
    sse /v1/generate "${POCKETGPT_API_KEY:-}" -H 'Content-Type: application/json' --data-binary "$body"
    exit 0
fi
# Print the text of each `token` event as it arrives; `done` ends the stream, `error` fails it.
# The event framing is read here by hand on purpose: the scripts need only bash, curl and any python3 (no
# package), so they work from a machine without pocketgpt installed; the tests read streams with httpx-sse.
sse /v1/generate "${POCKETGPT_API_KEY:-}" -H 'Content-Type: application/json' --data-binary "$body" |
    "$PY" -u -c '
import json, sys
event, data, status = "message", [], None
def dispatch(event, payload):
    if event == "token":
        sys.stdout.write(json.loads(payload)["text"])
        sys.stdout.flush()
        return None
    if event == "done":
        d = json.loads(payload)
        n, reason = d.get("usage", {}).get("completion_tokens"), d.get("finish_reason")
        speed = (d.get("timings") or {}).get("tokens_per_s") or 0.0
        sys.stdout.write("\n")
        sys.stderr.write(f"[{n} tokens, {reason}, {speed:.1f} tokens/s]\n")
        return 0
    if event == "error":
        sys.stdout.write("\n")
        sys.stderr.write(f"error: {payload}\n")
        return 1
    return None
for line in sys.stdin:
    line = line.rstrip("\r\n")
    if line.startswith(":"):
        continue
    if not line:
        if data:
            status = dispatch(event, "\n".join(data))
            if status is not None:
                break
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
if status is None:
    sys.stderr.write("stream ended without a done event\n")
    status = 1
sys.exit(status)
'
