# pocketgpt: train a small GPT, serve it with FastAPI.
# Builds with BuildKit or the legacy builder, offline too (no `# syntax=` line: BuildKit would fetch a frontend).
#
#   docker build -t pocketgpt:cpu .                                  # CPU torch (default)
#   docker build -t pocketgpt:cuda --build-arg TORCH_VARIANT=cuda .  # CUDA torch (PyPI's default build)
#   docker build --build-arg TORCH_VARIANT=cu128 .                   # a specific CUDA build from the PyTorch index
#
# TORCH_VARIANT: cpu   -> https://download.pytorch.org/whl/cpu (small, no CUDA libraries)
#                cuda  -> PyPI's torch wheel, which on Linux x86_64 is the CUDA build
#                cuXYZ -> https://download.pytorch.org/whl/cuXYZ (must exist for TORCH_VERSION)
#
# Offline (air-gapped) builds: put wheels for torch and every runtime dependency in docker/wheelhouse/ (or
# another folder in the context, --build-arg WHEELHOUSE=DIR); when it holds any wheel, pip installs from it
# alone (--no-index) and TORCH_VARIANT is not used. docker/wheelhouse.sh fills it. See docker/wheelhouse/README.md.
# BASE_IMAGE replaces python:3.11-slim (e.g. a stand-in built by docker/standin-base.sh where nothing can be pulled).

ARG PYTHON_VERSION=3.11
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim

# ---------------------------------------------------------------- builder: a venv with the app and its runtime deps
FROM ${BASE_IMAGE} AS builder
# The legacy builder keeps this stage as an untagged image: the label lets `docker image prune --filter` find it.
LABEL org.pocketgpt.stage=builder

ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG WHEELHOUSE=docker/wheelhouse

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# A wheelhouse with wheels in it makes the venv's pip offline (its site config, /opt/venv/pip.conf, which
# the last builder step deletes).
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY ${WHEELHOUSE}/ /tmp/wheelhouse/
RUN python -m venv /opt/venv \
    && if find /tmp/wheelhouse -name '*.whl' | grep -q .; then \
        printf '[global]\nno-index = true\nfind-links = /tmp/wheelhouse\n' > /opt/venv/pip.conf; \
    fi
ENV PATH=/opt/venv/bin:$PATH

# torch first, in its own layer: it is by far the largest dependency and changes least often.
# Installing it before the project means the project's loose "torch>=2.4" is already satisfied,
# so pip never swaps in a different build.
RUN if [ -f /opt/venv/pip.conf ]; then pip install "torch==${TORCH_VERSION}"; else case "$TORCH_VARIANT" in \
        cuda) pip install "torch==${TORCH_VERSION}" ;; \
        cpu|cu[0-9]*) pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" ;; \
        *) echo "unknown TORCH_VARIANT=${TORCH_VARIANT} (use cpu, cuda or cuXYZ)" >&2; exit 2 ;; \
    esac; fi

# The project itself: a regular (non-editable) install without the dev extra.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY training ./training
COPY app ./app
COPY pocketgpt ./pocketgpt
RUN pip install . && pip check && rm -f /opt/venv/pip.conf

# ---------------------------------------------------------------- runtime: slim image, venv only, non-root
FROM ${BASE_IMAGE} AS runtime

LABEL org.opencontainers.image.title="pocketgpt" \
      org.opencontainers.image.description="Train a small GPT on your own text, then serve it with FastAPI."

# chmod in a RUN, not `COPY --chmod` (which the legacy builder rejects).
COPY docker/entrypoint.sh /usr/local/bin/pocketgpt-entrypoint
RUN chmod 0755 /usr/local/bin/pocketgpt-entrypoint \
    && groupadd --system --gid 10001 pocketgpt \
    && useradd --system --uid 10001 --gid pocketgpt --home-dir /home/pocketgpt --create-home \
       --shell /usr/sbin/nologin pocketgpt \
    && mkdir -p /var/lib/pocketgpt/checkpoints /var/lib/pocketgpt/data /var/lib/pocketgpt/db \
    && chown -R pocketgpt:pocketgpt /var/lib/pocketgpt

COPY --from=builder /opt/venv /opt/venv

# State lives under /var/lib/pocketgpt: named volumes mounted there start as copies of these empty,
# pocketgpt-owned directories, so the non-root server can write to them.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    POCKETGPT_HOST=0.0.0.0 \
    POCKETGPT_PORT=8000 \
    POCKETGPT_CHECKPOINT_DIR=/var/lib/pocketgpt/checkpoints \
    POCKETGPT_DATA_DIR=/var/lib/pocketgpt/data \
    POCKETGPT_DB=/var/lib/pocketgpt/db/pocketgpt.db

USER 10001:10001
WORKDIR /home/pocketgpt
EXPOSE 8000

# curl is not in the slim image: probe /readyz with the standard library. The start period covers the
# first-run bootstrap (the starter model trains for at most POCKETGPT_STARTER_MAX_TIME seconds).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('POCKETGPT_PORT', '8000') + '/readyz', timeout=4)"]

ENTRYPOINT ["/usr/local/bin/pocketgpt-entrypoint"]
