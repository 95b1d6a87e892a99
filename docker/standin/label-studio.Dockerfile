# A stand-in for heartexlabs/label-studio:1.23.2 where no image registry is reachable (docker/harness.py builds it
# on its Debian stand-in only then): Label Studio from PyPI, the same data folder, port and start-up variables.
ARG BASE
FROM ${BASE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CONFIG_FILE=/build-inputs/pip.conf
COPY docker/build-inputs/ /build-inputs/
COPY requirements-ls.lock /src/
# At the versions the e2e tests run (requirements-ls.lock, .lsvenv's lock).
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install -q -c /src/requirements-ls.lock label-studio==1.23.2

FROM ${BASE}
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 LABEL_STUDIO_BASE_DATA_DIR=/label-studio/data HOME=/label-studio
COPY --from=builder /opt/venv /opt/venv
WORKDIR /label-studio
EXPOSE 8080
CMD ["label-studio", "start", "--no-browser", "--internal-host", "0.0.0.0", "--port", "8080"]
