#!/bin/sh
# pocketgpt entrypoint: the Docker image's ENTRYPOINT and what `make serve` runs on the host.
#
#   1. When the checkpoint to serve does not exist yet, train the starter model on the built-in corpus
#      (once; a few minutes on CPU, capped by POCKETGPT_STARTER_MAX_TIME). Later starts skip this.
#      SIGTERM/SIGINT during that training (docker stop, Ctrl-C) are passed on to the trainer, which saves and
#      exits; this script then exits with the trainer's status instead of serving, and the next start resumes. Works as PID 1 (no init)
#      and under an init (compose's `init: true`), where the trainer would otherwise be SIGKILLed.
#   2. exec the server (so it is the process that receives SIGTERM/SIGINT), configured by the
#      POCKETGPT_* environment, which it reads itself.
#
# Environment (all optional):
#   POCKETGPT_CHECKPOINT_DIR     checkpoint root (default ./checkpoints; /var/lib/pocketgpt/checkpoints in the image)
#   POCKETGPT_CHECKPOINT         checkpoint to serve (default: the starter, $POCKETGPT_CHECKPOINT_DIR/starter/best);
#                                one named explicitly must exist: only the starter is trained here
#   POCKETGPT_BOOTSTRAP          1 (default): train the starter when it is missing; 0: fail instead
#   POCKETGPT_STARTER_DATA       corpus of the starter model (default: stdlib, the Python standard library)
#   POCKETGPT_STARTER_MAX_STEPS  optimizer steps (default: none, the schedule follows the time budget)
#   POCKETGPT_STARTER_MAX_TIME   the starter's time budget, seconds (default: 300 on CPU, 600 on a GPU)
#   POCKETGPT_STARTER_ARGS       model and optimizer flags of `python -m pocketgpt.training train` for the starter
#                                (default: none, the planner sizes it for the budget and prints its plan)
#   POCKETGPT_DEVICE             auto (default), cpu, cuda, ...: used for training and serving
#   POCKETGPT_HOST, POCKETGPT_PORT, POCKETGPT_API_KEYS, ...: read by the server (see app/settings.py)
#   POCKETGPT_PYTHON             interpreter that has pocketgpt installed (default python3, found on PATH:
#                                the image's venv, or .venv/bin when `make serve` runs this)
set -eu
# Until the trainer or the server runs, a stop request simply ends the script (as PID 1, sh would ignore it).
trap 'exit 143' TERM
trap 'exit 130' INT

log() {
    printf 'pocketgpt: %s\n' "$*" >&2
}

PY="${POCKETGPT_PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1; then
    log "no Python interpreter '$PY': set POCKETGPT_PYTHON, or run 'make serve' (it creates .venv)"
    exit 2
fi
if ! "$PY" -c 'import pocketgpt.app.cli, pocketgpt.training' >/dev/null 2>&1; then
    log "'$PY' cannot import pocketgpt: run 'make serve' (it installs into .venv) or set POCKETGPT_PYTHON"
    exit 2
fi

CKPT_DIR="${POCKETGPT_CHECKPOINT_DIR:-./checkpoints}"
STARTER_RUN="$CKPT_DIR/starter"
STARTER="$STARTER_RUN/best"
CKPT="${POCKETGPT_CHECKPOINT:-$STARTER}"

# Run a command in the background, pass SIGTERM/SIGINT on to it, wait until it has exited; its status is left
# in $status and whether a signal came in $stopped. A trapped signal makes `wait` return early (status > 128)
# while the child still runs: wait again until it is gone. SIGINT is passed on as SIGTERM: Ctrl-C in a terminal
# has already sent SIGINT to the child (same process group), and the trainer treats a second SIGINT as "stop
# now, without saving"; any first signal asks it to finish the step and save.
child=""
stopped=""
status=0
forward_signal() {
    stopped="$1"
    [ -z "$child" ] || kill -s TERM "$child" 2>/dev/null || true
}
run_forwarding_signals() {
    trap 'forward_signal TERM' TERM
    trap 'forward_signal INT' INT
    "$@" &
    child=$!
    [ -z "$stopped" ] || kill -s TERM "$child" 2>/dev/null || true  # a signal that came before $child was set
    while :; do
        before="$stopped"
        status=0
        wait "$child" || status=$?
        if [ "$stopped" = "$before" ] || ! kill -0 "$child" 2>/dev/null; then
            break
        fi
    done
    if [ "$stopped" != "$before" ]; then  # a signal raced the child's exit: this wait reports its real status
        status=0
        wait "$child" || status=$?
    fi
    child=""
    trap 'exit 143' TERM
    trap 'exit 130' INT
}

is_checkpoint() {  # a directory holding a config and weights (or the .NAME.old a crashed save leaves)
    [ -f "$1/config.json" ] && [ -f "$1/model.safetensors" ] && return 0
    old="$(dirname "$1")/.$(basename "$1").old"
    [ -f "$old/config.json" ] && [ -f "$old/model.safetensors" ]
}

train_starter() {
    # Train into a hidden partial run dir and rename it into place only on success, so an interrupted
    # first run is never mistaken for a finished one. The next start resumes it from the `last/` checkpoint the
    # trainer saved when it was stopped (or trains afresh when there is none, or it cannot be resumed).
    partial="$CKPT_DIR/.starter.partial"
    device="${POCKETGPT_DEVICE:-auto}"
    if [ "$device" = auto ]; then
        device="$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')"
    fi
    # The starter: the best model its time budget allows (5 minutes on CPU, 10 on a GPU). With no shape flags
    # the trainer's planner picks the shape, vocabulary and learning rate for this machine and prints its plan.
    case "$device" in
        cuda*) max_time="${POCKETGPT_STARTER_MAX_TIME:-600}" ;;
        *)     max_time="${POCKETGPT_STARTER_MAX_TIME:-300}" ;;
    esac
    args="${POCKETGPT_STARTER_ARGS:-}"
    steps="${POCKETGPT_STARTER_MAX_STEPS:-}"
    if [ -n "$steps" ]; then
        args="--max-steps $steps --eval-every $(( steps / 4 > 0 ? steps / 4 : 1 )) $args"
    fi
    log "no checkpoint at $CKPT: training the starter model on '${POCKETGPT_STARTER_DATA:-stdlib}'" \
        "(${max_time}s budget${steps:+, $steps steps at most}, on $device)"
    mkdir -p "$CKPT_DIR"
    fresh=1
    if is_checkpoint "$partial/last"; then
        log "resuming the starter's interrupted training from $partial/last"
        run_forwarding_signals "$PY" -m pocketgpt.training train --resume "$partial" \
            --device "$device" --max-time "$max_time" ${steps:+--max-steps "$steps"}
        fresh=0
        if [ -z "$stopped" ] && { [ "$status" -ne 0 ] || ! is_checkpoint "$partial/best"; }; then
            log "could not resume (status $status, or no best checkpoint): training the starter from the beginning"
            fresh=1
        fi
    fi
    if [ "$fresh" = 1 ]; then
        rm -rf "$partial"
        # $args is split into words on purpose.
        # shellcheck disable=SC2086
        run_forwarding_signals "$PY" -m pocketgpt.training train \
            --data "${POCKETGPT_STARTER_DATA:-stdlib}" \
            --device "$device" \
            --max-time "$max_time" \
            --out "$partial" \
            $args
    fi
    if [ -n "$stopped" ]; then
        # Not renamed into place: the next start resumes from what the trainer saved.
        log "SIG$stopped during the starter's training: the trainer stopped (status $status); not serving"
        [ "$status" -ne 0 ] || status=143
        exit "$status"
    fi
    if [ "$status" -ne 0 ]; then
        log "the starter's training failed (status $status)"
        exit "$status"
    fi
    if ! is_checkpoint "$partial/best"; then
        log "training finished without a checkpoint in $partial/best"
        exit 1
    fi
    rm -rf "$STARTER_RUN"
    mv "$partial" "$STARTER_RUN"
    log "starter model saved in $STARTER"
}

if ! is_checkpoint "$CKPT"; then
    if [ -n "${POCKETGPT_CHECKPOINT:-}" ] && [ "$CKPT" != "$STARTER" ]; then
        log "POCKETGPT_CHECKPOINT=$CKPT is not a checkpoint directory (no config.json + model.safetensors)"
        exit 2
    fi
    if [ "${POCKETGPT_BOOTSTRAP:-1}" = 0 ]; then
        log "no checkpoint at $CKPT and POCKETGPT_BOOTSTRAP=0: not training one"
        exit 2
    fi
    train_starter
else
    log "serving the existing checkpoint $CKPT"
fi

# The line to try, for a person watching the terminal (tokens stay secret: only their names are shown).
# The prompt ends in a word, not a space: a trailing space is a token of its own that the BPE tokenizer
# never produces before a word in training text, so "def " continues worse than "def __init__(self".
port="${POCKETGPT_PORT:-8000}"
host="${POCKETGPT_HOST:-127.0.0.1}"
case "$host" in
    0.0.0.0 | :: | "") url_host=127.0.0.1 ;;
    *:*) url_host="[$host]" ;;
    *) url_host="$host" ;;
esac
auth=""
[ -n "${POCKETGPT_API_KEYS:-}" ] && auth=" -H \"Authorization: Bearer \$POCKETGPT_API_KEY\""
log "starting the server on port $port; once it is up, try:"
printf '\n  curl -N http://%s:%s/v1/generate%s -H "Content-Type: application/json" \\\n' \
    "$url_host" "$port" "$auth" >&2
printf '       -d '\''{"prompt": "def __init__(self", "max_new_tokens": 100, "temperature": 0.3, "stream": true}'\''\n' >&2
printf '\n  or: scripts/stream.sh -t 0.3 "def __init__(self"   (see scripts/*.sh -h)\n\n' >&2

export POCKETGPT_CHECKPOINT="$CKPT"
exec "$PY" -m pocketgpt.app.cli serve
