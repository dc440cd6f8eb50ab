# syntax=docker/dockerfile:1
# pyrycode-relay container image: `docker build -t pyrycode-relay .` (docs/operations.md).
#
# Base image: CPython 3.11 on Debian bookworm, slim, pinned by exact tag AND digest (the digest
# wins; the tag says what it is). The digest of this multi-platform index was taken from public
# sources while writing this file, on a machine without a Docker engine or registry access, so it
# was not re-resolved there. To move to a newer patch release, replace both together with the
# output of:   docker buildx imagetools inspect python:3.11.<patch>-slim-bookworm
# Both stages use the same base, so the venv's interpreter symlinks resolve in the runtime stage.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# --- build: a self-contained virtualenv under /opt/venv -------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md hatch_build.py ./
COPY requirements ./requirements
COPY scripts/install.sh ./scripts/install.sh
COPY src ./src
# The one install command, the same as the README's "Set up" (tests/ops/test_deploy_files.py
# keeps them identical): exactly the versions in requirements/runtime.lock, hashes checked,
# wheels only, so no compiler is needed and two builds of one commit install the same bytes.
# pip itself is removed from the venv afterwards because nothing installs at run time.
# The build context has no .git: pass the revision for `--version`, e.g.
# `docker build --build-arg SOURCE_REVISION="$(git rev-parse --short=12 HEAD)" .`
ARG SOURCE_REVISION=""
RUN bash scripts/install.sh /opt/venv requirements/runtime.lock \
 && /opt/venv/bin/python -m pip uninstall --yes --quiet pip

# --- runtime: the interpreter, the venv, an unprivileged user; no pip, no build tools -------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYRYCODE_RELAY_CERT_CACHE=/var/lib/pyrycode-relay/certs
# uid/gid 65532 is distroless's "nonroot", the same identity as the reference relay's image.
# The cert cache is created 0700 and owned by that uid, which is what the relay requires of it;
# a fresh named volume mounted there inherits both. The base image's own pip/setuptools/wheel
# go too: the runtime image installs nothing.
RUN groupadd --system --gid 65532 nonroot \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin nonroot \
 && install -d -m 0700 -o 65532 -g 65532 /var/lib/pyrycode-relay /var/lib/pyrycode-relay/certs \
 && python3 -m pip uninstall --yes --quiet pip setuptools wheel
COPY --from=build /opt/venv /opt/venv
USER 65532:65532
VOLUME ["/var/lib/pyrycode-relay/certs"]
# 443: WebSockets and /healthz over TLS; 80: ACME HTTP-01 challenges (404 for anything else).
# Docker (20.10+) lets an unprivileged user bind ports below 1024 inside the container's own
# network namespace; other runtimes may need --https-listen=:8443 --http-listen=:8080 instead.
EXPOSE 80 443
# Liveness of the relay process itself: its loopback metrics listener answers on the same event
# loop as the WebSocket listeners, and it is plain HTTP with no Host check or PROXY header in
# every mode (TLS, PROXY v2, insecure), unlike /healthz. A failed listener makes the relay exit,
# so "answers here" means "serving". If you move or disable --metrics-listen, override this.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request as u; a = os.environ.get('PYRYCODE_RELAY_METRICS_LISTEN') or '127.0.0.1:9090'; u.urlopen('http://' + a + '/metrics', timeout=4)"]
# Give flags as arguments (docker run IMAGE --domain relay.example.org) or as
# PYRYCODE_RELAY_<FLAG> variables. With neither --domain, --tls-cert nor --insecure-listen the
# relay exits 2 with a one-line reason.
ENTRYPOINT ["pyrycode-relay"]
