#!/usr/bin/env bash
# Complete a prompt through the OpenAI-compatible POST /v1/completions (JSON, or streamed with -S).
set -euo pipefail
# shellcheck source=scripts/_lib.sh
. "$(dirname "$0")/_lib.sh"

usage() {
    cat <<USAGE
usage: $PROG [-m MODEL] [-n MAX_TOKENS] [-t TEMPERATURE] [-p TOP_P] [-s SEED] [--stop STR] [-S] [-j] PROMPT

Send PROMPT ('-' reads it from stdin) to /v1/completions, the OpenAI completions API, and print the text.
  -m, --model NAME         model name (default: \$POCKETGPT_MODEL, else the server's; see GET /v1/models)
  -n, --max-tokens N       tokens to generate at most (default 100)
  -t, --temperature X      0 = greedy (default 0.7)
  -p, --top-p X            nucleus sampling mass (default: off)
  -s, --seed N             seed for a reproducible sample
      --stop STR           stop string (repeatable, up to 4)
  -S, --stream             stream the text as it is generated (data: chunks ending with data: [DONE])
  -j, --json               print the whole JSON response (without -S)
      --models             list the served models (GET /v1/models) and exit
Environment: POCKETGPT_URL (default http://127.0.0.1:8000), POCKETGPT_API_KEY, POCKETGPT_MODEL.
Any OpenAI client works too: base_url=\$POCKETGPT_URL/v1, api_key=\$POCKETGPT_API_KEY.
USAGE
}

model="${POCKETGPT_MODEL:-}" max_tokens=100 temperature=0.7 top_p="" seed="" stream=0 raw=0 models=0
prompt="" have_prompt=0 stops=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        -m | --model) need_value "$1" "${2-}"; model="$2"; shift 2 ;;
        -n | --max-tokens) need_value "$1" "${2-}"; max_tokens="$2"; shift 2 ;;
        -t | --temperature) need_value "$1" "${2-}"; temperature="$2"; shift 2 ;;
        -p | --top-p) need_value "$1" "${2-}"; top_p="$2"; shift 2 ;;
        -s | --seed) need_value "$1" "${2-}"; seed="$2"; shift 2 ;;
        --stop) need_value "$1" "${2-}"; stops+=("$2"); shift 2 ;;
        -S | --stream) stream=1; shift ;;
        -j | --json) raw=1; shift ;;
        --models) models=1; shift ;;
        --) shift; [ $# -eq 1 ] || die "expected one PROMPT after --"; prompt="$1"; have_prompt=1; shift ;;
        -?*) [ "$1" = - ] && { prompt="$1"; have_prompt=1; shift; continue; }; die "unknown option $1 (see $PROG -h)" ;;
        *) [ "$have_prompt" = 0 ] || die "expected one PROMPT (quote it)"; prompt="$1"; have_prompt=1; shift ;;
    esac
done

if [ "$models" = 1 ]; then
    http GET /v1/models "${POCKETGPT_API_KEY:-}" | json_get 'd'
    exit 0
fi
[ "$have_prompt" = 1 ] || { usage >&2; exit 2; }
[ "$prompt" = - ] && prompt="$(cat)"

stop_json=""
[ ${#stops[@]} -gt 0 ] && stop_json="$("$PY" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "${stops[@]}")"
stream_flag=""
[ "$stream" = 1 ] && stream_flag=true
body="$(json_obj model s "$model" prompt s "$prompt" max_tokens n "$max_tokens" temperature n "$temperature" \
    top_p n "$top_p" seed n "$seed" stop j "$stop_json" stream b "$stream_flag")"

if [ "$stream" = 0 ]; then
    response="$(http POST /v1/completions "${POCKETGPT_API_KEY:-}" -H 'Content-Type: application/json' \
        --data-binary "$body")"
    if [ "$raw" = 1 ]; then
        printf '%s\n' "$response" | json_get 'd'
    else
        printf '%s\n' "$response" | json_get 'd["choices"][0]["text"]'
    fi
    exit 0
fi
# Streamed: `data: {chunk}` lines, each with choices[0].text; `data: [DONE]` ends the stream.
# Read by hand on purpose (only `data:` lines matter): the scripts need only bash, curl and any python3.
sse /v1/completions "${POCKETGPT_API_KEY:-}" -H 'Content-Type: application/json' --data-binary "$body" |
    "$PY" -u -c '
import json, sys
done = False
for line in sys.stdin:
    line = line.rstrip("\r\n")
    if not line.startswith("data:"):
        if line and not line.startswith((":", "event:", "id:", "retry:")):
            sys.stderr.write(line + "\n")  # not an event stream: an error body
        continue
    payload = line[5:].strip()
    if payload == "[DONE]":
        done = True
        break
    chunk = json.loads(payload)
    if "error" in chunk:
        sys.stderr.write("\nerror: " + payload + "\n")
        sys.exit(1)
    for choice in chunk.get("choices") or []:
        sys.stdout.write(choice.get("text") or "")
    sys.stdout.flush()
sys.stdout.write("\n")
sys.exit(0 if done else 1)
'
