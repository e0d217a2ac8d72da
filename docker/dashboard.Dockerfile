# optuna-dashboard for the compose file's `dashboard` profile, pinned to the Optuna the workers run.
#
# The official ghcr.io/optuna/optuna-dashboard image installs whatever Optuna was current when it was
# built; this one pins both, so that the dashboard reads (and, if it starts first, creates) the
# same tables the workers write. The storage URL comes from the environment (docker-compose.yml).
FROM python:3.11-slim

ARG OPTUNA_DASHBOARD_VERSION=0.21.0
# Same default as docker/Dockerfile: the workers' Optuna.
ARG OPTUNA_VERSION=5.0.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install "optuna-dashboard==${OPTUNA_DASHBOARD_VERSION}" "optuna==${OPTUNA_VERSION}" \
        "psycopg2-binary>=2.9" \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin dashboard
USER dashboard
EXPOSE 8080

CMD ["optuna-dashboard", "--help"]
