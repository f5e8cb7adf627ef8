# CPU image for the API and the workers (one image; the command picks the role).
# Build: docker build -t axion:cpu .      Run: docker run -p 3000:3000 axion:cpu axion serve
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/axion
ENV PATH=/opt/axion/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY api api
COPY workers workers
COPY common common
# CPU torch from its own index first, so the install never pulls the CUDA wheels.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PATH=/opt/axion/bin:$PATH HF_HOME=/models FASTEMBED_CACHE_PATH=/models/fastembed
RUN apt-get update && apt-get install -y --no-install-recommends redis-server && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 axion && mkdir -p /models && chown axion /models
COPY --from=build /opt/axion /opt/axion
USER axion
WORKDIR /home/axion
VOLUME ["/models"]
EXPOSE 3000
# Liveness of the API role; worker containers turn it off (compose) or use no probe (Kubernetes).
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/health', timeout=2)" || exit 1
CMD ["axion", "api"]
