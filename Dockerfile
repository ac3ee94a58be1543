# syntax=docker/dockerfile:1
#
# Build:  docker build -t chainguard-identity-operator:0.1.0 .
# Run:    docker run --read-only --tmpfs /tmp -e CGID_... chainguard-identity-operator:0.1.0
#
# Stage 1 builds wheels for the package and every dependency. Stage 2 installs from those wheels only
# (--no-index: nothing is fetched or compiled there) through a build-time bind mount, so no wheel, source
# file, test or compiler ends up in a layer of the final image.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# pyproject.toml names README.md as the package's readme, so the build needs it.
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="chainguard-identity-operator" \
      org.opencontainers.image.description="Kubernetes operator for Chainguard assumable identities" \
      org.opencontainers.image.licenses="Apache-2.0"
# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only; pip already compiled the bytecode at install.
# HOME=/tmp: the only writable place (an emptyDir in the pod), should any library want a home directory.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels chainguard-identity-operator
# A numeric user (so that runAsNonRoot can be verified by the kubelet) that also has a passwd entry:
# kopf names itself after getpass.getuser(), which fails for a uid that /etc/passwd does not know.
RUN groupadd --system --gid 65532 nonroot \
    && useradd --system --uid 65532 --gid 65532 --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin nonroot
USER 65532:65532
# 8080: kopf's liveness endpoint /healthz (CGID_LIVENESS_PORT); 9090: Prometheus /metrics (CGID_METRICS_PORT).
EXPOSE 8080 9090
HEALTHCHECK --interval=30s --timeout=5s \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CGID_LIVENESS_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["chainguard-identity-operator"]
CMD ["run"]
