# The Label Studio ML backend: Flask + gunicorn, no torch (a few hundred MB instead of several GB).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY model ./model
COPY worker ./worker
COPY backend ./backend
RUN pip install '.[backend]' && python -c "import importlib.util as u; assert u.find_spec('torch') is None"
EXPOSE 9090
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9090/health', timeout=2).status == 200 else 1)"
CMD ["lisa-ls", "serve", "--host", "0.0.0.0", "--port", "9090"]
