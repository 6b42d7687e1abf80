# shellcheck shell=bash
# Shared helpers for the pocketgpt curl scripts (sourced, not run). Needs bash, curl and python3.
#
# Environment:
#   POCKETGPT_URL          server base URL (default http://127.0.0.1:8000)
#   POCKETGPT_API_KEY      API key for the generation routes (sent as a Bearer token when set)
#   POCKETGPT_ADMIN_TOKEN  admin token for /admin/* (sent as a Bearer token)
#   POCKETGPT_PYTHON       python used to build and read JSON (default python3)
# Tokens are handed to curl through a file descriptor, never on its command line (where `ps` shows them).

POCKETGPT_URL="${POCKETGPT_URL:-http://127.0.0.1:8000}"
POCKETGPT_URL="${POCKETGPT_URL%/}"
PY="${POCKETGPT_PYTHON:-python3}"
PROG="$(basename "$0")"

die() {
    echo "$PROG: $*" >&2
    exit 2
}

need_value() {  # need_value OPTION VALUE: fail when an option has no argument
    [ -n "${2-}" ] || die "option $1 needs a value (see $PROG -h)"
}

# json_obj KEY TYPE VALUE ...: print a JSON object; TYPE is s (string), n (number), b (boolean) or
# j (raw JSON). Triples whose VALUE is empty are left out, so optional fields stay optional.
json_obj() {
    "$PY" -c '
import json, sys
args, out = sys.argv[1:], {}
if len(args) % 3:
    sys.exit("json_obj: arguments must be KEY TYPE VALUE triples")
for key, kind, value in zip(args[0::3], args[1::3], args[2::3]):
    if value == "":
        continue
    try:
        if kind == "s":
            out[key] = value
        elif kind == "n":
            number = json.loads(value)
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise ValueError
            out[key] = number
        elif kind == "b":
            out[key] = value.lower() in ("1", "true", "yes", "on")
        elif kind == "j":
            out[key] = json.loads(value)
        else:
            sys.exit(f"json_obj: unknown type {kind!r}")
    except ValueError:
        sys.exit(f"invalid value for {key}: {value!r}")
print(json.dumps(out))
' "$@"
}

# json_get EXPR: read JSON on stdin, print the Python expression EXPR evaluated with `d` bound to it
# (strings as-is, anything else as JSON). Example: json_get 'd["text"]'
json_get() {
    "$PY" -c '
import json, sys
text = sys.stdin.read()
if not text.strip():
    sys.exit(1)  # the request failed; http() has already said why
try:
    d = json.loads(text)
except ValueError:
    sys.exit("not JSON: " + text[:500])
v = eval(sys.argv[1], {"__builtins__": {}}, {"d": d})
print(v if isinstance(v, str) else json.dumps(v, indent=2, ensure_ascii=False))
' "$1"
}

_auth_header() {  # _auth_header TOKEN: the header line for a Bearer token (empty token: no header)
    [ -n "$1" ] && printf 'Authorization: Bearer %s\n' "$1"
    printf 'Accept: */*\n'
}

# http METHOD PATH TOKEN [curl args...]: one request; prints the response body on success.
# On an HTTP error (>= 400) prints the status and body on stderr and returns 1; curl's own errors
# (server unreachable, ...) return curl's exit code.
http() {
    local method="$1" path="$2" token="$3" body status rc=0
    shift 3
    body="$(mktemp)"
    status="$(curl -sS -X "$method" -o "$body" -w '%{http_code}' \
        -H @<(_auth_header "$token") "$@" "$POCKETGPT_URL$path")" || rc=$?
    if [ "$rc" -ne 0 ]; then
        rm -f "$body"
        echo "$PROG: request to $POCKETGPT_URL$path failed (curl exit $rc)" >&2
        return "$rc"
    fi
    if [ "$status" -ge 400 ]; then
        echo "$PROG: HTTP $status from $method $path" >&2
        cat "$body" >&2
        echo >&2
        rm -f "$body"
        return 1
    fi
    cat "$body"
    rm -f "$body"
}

# sse PATH TOKEN [curl args...]: stream a Server-Sent Events response to stdout as it arrives.
# An HTTP error status makes curl print the body and exit 22 (--fail-with-body).
sse() {
    local path="$1" token="$2"
    shift 2
    curl -sS -N --fail-with-body -H 'Accept: text/event-stream' \
        -H @<(_auth_header "$token") "$@" "$POCKETGPT_URL$path"
}
