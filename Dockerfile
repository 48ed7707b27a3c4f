# registry-gateway's container image:  docker build -t registry-gateway .
#
# BASE is any Debian-like image with python3 (3.11 or newer) and its venv module; both
# stages use it, so the virtualenv's interpreter is the same path at build and at run time.
# pip reads the usual PIP_* settings, passed as build arguments when PyPI is not the index
# to use, e.g. a mirror closer to you:
#   docker build --build-arg PIP_INDEX_URL=https://mirror.example.com/pypi/simple .
# or, offline, wheels put into ./wheels/ beforehand (`pip wheel -w wheels . setuptools wheel`
# elsewhere, with the image's Python version):
#   docker build --build-arg PIP_FIND_LINKS=/src/wheels --build-arg PIP_NO_INDEX=1 .
ARG BASE=python:3.12-slim-bookworm

FROM ${BASE} AS builder
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY . .
# The wheel first (what `pip install` of a release would get), then a venv with it alone:
# no build tools, no source tree and no pip cache reach the runtime stage.
RUN python3 -m venv /opt/registry-gateway \
 && /opt/registry-gateway/bin/pip wheel --no-deps --wheel-dir /dist . \
 && /opt/registry-gateway/bin/pip install /dist/registry_gateway-*.whl \
 && { /opt/registry-gateway/bin/pip uninstall --yes --quiet pip setuptools 2>/dev/null || true; } \
 && install -m 0644 deploy/healthcheck.py /opt/registry-gateway/healthcheck.py \
 && /opt/registry-gateway/bin/registry-gateway --version

FROM ${BASE}
LABEL org.opencontainers.image.title="registry-gateway" \
      org.opencontainers.image.description="A read-only OCI pull-through mirror for many upstream registries" \
      org.opencontainers.image.licenses="Apache-2.0"
# Its own unprivileged user; the numeric id lets Kubernetes' runAsNonRoot verify it.
RUN groupadd --system --gid 10001 registry-gateway \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/registry-gateway \
      --no-create-home --shell /usr/sbin/nologin registry-gateway \
 && mkdir -p /var/lib/registry-gateway /etc/registry-gateway/certs \
 && chown 10001:10001 /var/lib/registry-gateway && chmod 0750 /var/lib/registry-gateway
COPY --from=builder /opt/registry-gateway /opt/registry-gateway
COPY routes.yaml /etc/registry-gateway/routes.yaml
ENV PATH=/opt/registry-gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HEALTHCHECK_URL=http://127.0.0.1:5000/healthz
# The cache: a volume, so a new image (an upgrade) keeps it.
VOLUME ["/var/lib/registry-gateway"]
WORKDIR /var/lib/registry-gateway
USER 10001:10001
EXPOSE 5000
# Python's urllib, not curl: the slim bases have no curl. HEALTHCHECK_URL follows --listen.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python3", "/opt/registry-gateway/healthcheck.py"]
ENTRYPOINT ["registry-gateway"]
CMD ["serve", "--routes", "/etc/registry-gateway/routes.yaml", \
     "--data-dir", "/var/lib/registry-gateway", "--certs", "/etc/registry-gateway/certs", \
     "--listen", "0.0.0.0:5000"]
