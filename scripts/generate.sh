#!/usr/bin/env bash
# Generate text with POST /v1/generate (one JSON response).
set -euo pipefail
# shellcheck source=scripts/_lib.sh
. "$(dirname "$0")/_lib.sh"

usage() {
    cat <<USAGE
usage: $PROG [-n MAX_NEW_TOKENS] [-t TEMPERATURE] [-k TOP_K] [-p TOP_P] [-s SEED] [--stop STR] [-j] PROMPT

Continue PROMPT ('-' reads it from stdin) and print the generated text.
  -n, --max-new-tokens N   tokens to generate at most (default 100)
  -t, --temperature X      0 = greedy (default 0.7)
  -k, --top-k N            keep the N most likely tokens (default: off)
  -p, --top-p X            nucleus sampling mass (default: off)
  -s, --seed N             seed for a reproducible sample
      --stop STR           stop string (repeatable, up to 4)
  -j, --json               print the whole JSON response (text, finish_reason, usage, timings)
Environment: POCKETGPT_URL (default http://127.0.0.1:8000), POCKETGPT_API_KEY.
Example: $PROG -n 60 -t 0.3 'def __init__(self'
USAGE
}

max_new=100 temperature=0.7 top_k="" top_p="" seed="" raw=0 prompt="" have_prompt=0 stops=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        -n | --max-new-tokens) need_value "$1" "${2-}"; max_new="$2"; shift 2 ;;
        -t | --temperature) need_value "$1" "${2-}"; temperature="$2"; shift 2 ;;
        -k | --top-k) need_value "$1" "${2-}"; top_k="$2"; shift 2 ;;
        -p | --top-p) need_value "$1" "${2-}"; top_p="$2"; shift 2 ;;
        -s | --seed) need_value "$1" "${2-}"; seed="$2"; shift 2 ;;
        --stop) need_value "$1" "${2-}"; stops+=("$2"); shift 2 ;;
        -j | --json) raw=1; shift ;;
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
    top_k n "$top_k" top_p n "$top_p" seed n "$seed" stop j "$stop_json")"

response="$(http POST /v1/generate "${POCKETGPT_API_KEY:-}" -H 'Content-Type: application/json' --data-binary "$body")"
if [ "$raw" = 1 ]; then
    printf '%s\n' "$response" | json_get 'd'
else
    printf '%s\n' "$response" | json_get 'd["text"]'
fi
