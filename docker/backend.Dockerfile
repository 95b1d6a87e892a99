# The Label Studio ML backend: Flask + gunicorn, no torch (a few hundred MB instead of several GB).
# BASE: any Debian-based image with python3.11 and its venv module; the default is the public image users pull.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE} AS builder
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH \
    PIP_CONFIG_FILE=/build-inputs/pip.conf
# Optional build inputs (docker/build-inputs/README.md): only this stage sees them.
COPY docker/build-inputs/ /build-inputs/
COPY pyproject.toml requirements.lock docker/requirements.py /src/
# The dependencies of '.[backend]' at the versions the tests ran (requirements.lock), then: no torch.
RUN python3 -m venv /opt/venv && python3 /src/requirements.py /src/pyproject.toml backend > /src/req.txt \
 && pip install -c /src/requirements.lock -r /src/req.txt && python -c "import importlib.util as u; assert u.find_spec('torch') is None"

FROM ${BASE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH PYTHONPATH=/app
COPY --from=builder /opt/venv /opt/venv
COPY docker/lisa-ls /opt/venv/bin/lisa-ls
# The source last, in small layers: a code change rebuilds only these.
COPY model /app/model
COPY worker /app/worker
COPY backend /app/backend
WORKDIR /data
EXPOSE 9090
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9090/health', timeout=2).status == 200 else 1)"
CMD ["lisa-ls", "serve", "--host", "0.0.0.0", "--port", "9090"]
