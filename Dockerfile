# CPU image for the API and the workers (one image, the command picks the role).
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HOME=/models
RUN useradd --create-home --uid 10001 axion && mkdir -p /models && chown axion /models
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api api
COPY workers workers
COPY common common
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir .
USER axion
VOLUME ["/models"]
EXPOSE 3000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/health', timeout=2)" || exit 1
CMD ["axion", "api"]
