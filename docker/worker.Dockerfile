# A GPU worker: CUDA PyTorch + LISA. One container per GPU; the model is downloaded into the HF cache volume once.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HOME=/hf-cache
WORKDIR /app
COPY pyproject.toml README.md ./
COPY model ./model
COPY worker ./worker
COPY backend ./backend
RUN pip install '.[worker,quant]'
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s CMD ["python", "-m", "worker.gpu.health"]
ENTRYPOINT ["lisa-ls", "worker"]
