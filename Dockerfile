# tda-collector: live mode by default; history with `docker run IMAGE --mode=history --start=...`.
FROM python:3.13-slim

# pip runs as root only while the image is built; the daemon runs as the user below.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A fixed non-root uid, so a bind-mounted /data can be chowned to it on the host. Not a
# --system account (those end at uid 999: useradd warned); --no-log-init keeps lastlog small.
RUN groupadd --gid 10001 collector \
    && useradd --no-log-init --no-create-home --uid 10001 --gid 10001 --home-dir /app \
        --shell /usr/sbin/nologin collector \
    && mkdir -p /data \
    && chown 10001:10001 /data

WORKDIR /app

# Dependencies first: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build src/*.egg-info

COPY config.yaml ./config.yaml

# The image's config: state and candles on the volume, the admin server reachable from
# outside the container (Prometheus scrapes /metrics, the healthcheck asks /healthz).
ENV CONFIG_PATH=/app/config.yaml \
    TDA__STORAGE__DUCKDB__PATH=/data/ohlcv.duckdb \
    TDA__STATE_PATH=/data/state.sqlite \
    TDA__ADMIN__HOST=0.0.0.0 \
    TDA__ADMIN__PORT=8080

VOLUME /data
EXPOSE 8080
USER 10001:10001

# No curl in the slim image: ask /healthz with Python itself.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('TDA__ADMIN__PORT', '8080') + '/healthz', timeout=4)"]

ENTRYPOINT ["python", "-m", "tda_collector"]
CMD ["--mode=live"]
