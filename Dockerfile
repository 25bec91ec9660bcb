# tokenvend container image (deploy/README.md). Two stages: the builder installs the locked
# dependencies into /opt/venv from wheels only, so no compiler is needed in either stage; the final
# stage gets that venv, app/ and migrations/, and runs as an unprivileged user.
#
#   docker build -t tokenvend .
#   docker run --rm -p 8000:8000 tokenvend serve --dev --host 0.0.0.0   # the embedded default

FROM python:3.11-slim-bookworm AS builder

ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv

WORKDIR /srv/tokenvend

# Dependencies first, so that a code change reuses this layer.
COPY requirements.lock ./
RUN pip install --no-cache-dir --only-binary=:all: -r requirements.lock

# `tokenvend db upgrade` looks for migrations/ beside the package (app/cli.py: ROOT is the parent of
# app/), so app/ and migrations/ stay side by side in /srv/tokenvend, and the venv points there: an
# editable install is a .pth file naming /srv/tokenvend plus the `tokenvend` console script.
COPY pyproject.toml README.md ./
COPY app/ app/
COPY migrations/ migrations/
RUN pip install --no-cache-dir --no-deps --editable . \
    && python -m compileall -q --invalidation-mode unchecked-hash app


FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="tokenvend" \
      org.opencontainers.image.description="Token broker that vends Phrase JWTs"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A fixed numeric uid/gid, so that Kubernetes' runAsNonRoot can verify it without a passwd lookup.
# /var/lib/tokenvend is the working directory and the only place the user may write (used by
# `serve --dev` and a SQLite database; production mounts nothing there and may run read-only).
RUN groupadd --system --gid 10001 tokenvend \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin tokenvend \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/tokenvend

# Owned by root and read-only for the service user.
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /srv/tokenvend/app /srv/tokenvend/app
COPY --from=builder /srv/tokenvend/migrations /srv/tokenvend/migrations

WORKDIR /var/lib/tokenvend
USER 10001:10001
EXPOSE 8000

# Liveness only (the process answers HTTP); readiness is /readyz. slim has no curl: use Python.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]

ENTRYPOINT ["tokenvend"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
