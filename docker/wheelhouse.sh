#!/bin/sh
# Fill a wheelhouse for an offline image build (see docker/wheelhouse/README.md):
#
#   docker/wheelhouse.sh [DIR]        # default docker/wheelhouse
#
# Runs `pip wheel` for torch and the project's runtime dependencies (plus setuptools, which builds the project
# inside the image), from pip's cache and configured indexes. The host's Python must be the image's (3.11):
# wheels are built for the Python that runs pip.
#   PYTHON         interpreter with pip (default: .venv/bin/python if present, else python3)
#   TORCH_VERSION  default 2.13.0, as the Dockerfile
#   PIP_ARGS       extra pip arguments, e.g. "--extra-index-url https://download.pytorch.org/whl/cpu"
set -eu
cd "$(dirname "$0")/.."

dir="${1:-docker/wheelhouse}"
py="${PYTHON:-}"
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
mkdir -p "$dir"
# $PIP_ARGS is split into words on purpose.
# shellcheck disable=SC2086
"$py" -m pip wheel --quiet --wheel-dir "$dir" ${PIP_ARGS:-} \
    "torch==${TORCH_VERSION:-2.13.0}" . 'setuptools>=68' wheel
# The project itself is built in the image from the context, never from a wheel made here.
rm -f "$dir"/pocketgpt-*.whl
echo "wheelhouse: $(find "$dir" -name '*.whl' | wc -l) wheels in $dir"
