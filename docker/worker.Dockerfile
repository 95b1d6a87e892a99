# The model worker: the torch/torchvision pair the tests run, from PyPI's CUDA wheels (they carry their own CUDA
# runtime: one image runs on a GPU host through the NVIDIA container toolkit, and on CPU) + the '.[worker,quant]'
# dependencies at the versions of requirements.lock. One container per GPU; models are downloaded into the HF cache
# volume once. The offline demo model (models/demo) is inside, for `--profile cpu`.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE} AS builder
ARG TORCH="torch==2.14.1 torchvision==0.29.1"
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH \
    PIP_CONFIG_FILE=/build-inputs/pip.conf
# Optional build inputs (docker/build-inputs/README.md): only this stage sees them.
COPY docker/build-inputs/ /build-inputs/
COPY pyproject.toml requirements.lock docker/requirements.py /src/
# One pip run, so that torch (CUDA build), the extras and the lock resolve together.
RUN python3 -m venv /opt/venv && python3 /src/requirements.py /src/pyproject.toml worker quant > /src/req.txt \
 && pip install -c /src/requirements.lock -r /src/req.txt $TORCH \
 && python -c "import torch, torchvision; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

FROM ${BASE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH PYTHONPATH=/app HF_HOME=/hf-cache
COPY --from=builder /opt/venv /opt/venv
COPY docker/lisa-ls /opt/venv/bin/lisa-ls
COPY models/demo /app/models/demo
# The source last, in small layers: a code change rebuilds only these.
COPY model /app/model
COPY worker /app/worker
COPY backend /app/backend
WORKDIR /app
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s CMD ["python", "-m", "worker.gpu.health"]
ENTRYPOINT ["lisa-ls", "worker"]
