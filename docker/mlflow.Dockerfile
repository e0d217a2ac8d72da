# A small MLflow tracking server image with the PostgreSQL driver.
#
# The official ghcr.io/mlflow/mlflow image has no psycopg2, so it cannot use PostgreSQL as its
# backend store. The server's command line (backend URI, artifacts, allowed hosts) is in
# docker-compose.yml; nothing secret is baked in here.
FROM python:3.11-slim

# Same default as docker/Dockerfile, so that the workers' client matches the server.
ARG MLFLOW_VERSION=3.17.2

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install "mlflow==${MLFLOW_VERSION}" "psycopg2-binary>=2.9" \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin mlflow \
    && mkdir /mlartifacts && chown mlflow:mlflow /mlartifacts

# A named volume mounted on /mlartifacts starts as a copy of this (empty, mlflow-owned) folder,
# so the non-root server can write artifacts into it.
VOLUME /mlartifacts
USER mlflow
EXPOSE 5000

CMD ["mlflow", "server", "--help"]
