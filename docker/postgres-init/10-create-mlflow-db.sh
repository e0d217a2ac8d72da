#!/bin/sh
# Creates the MLflow database beside the Optuna one (POSTGRES_DB), on the first start only:
# the official postgres image runs /docker-entrypoint-initdb.d/* when its data volume is empty.
#
# Two databases, not one: Optuna's RDB storage and MLflow's tracking store each keep their
# schema version in a table named `alembic_version`, so they cannot share a database.
set -eu

: "${MLFLOW_DB:=mlflow}"
if [ "$MLFLOW_DB" = "$POSTGRES_DB" ]; then
    echo "MLFLOW_DB must differ from POSTGRES_DB (both are '$MLFLOW_DB'): Optuna and MLflow" \
         "both keep an alembic_version table" >&2
    exit 1
fi

# CREATE DATABASE cannot run inside a DO block, hence the \gexec: create it only if missing.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     --set=dbname="$MLFLOW_DB" --set=owner="$POSTGRES_USER" <<'SQL'
SELECT format('CREATE DATABASE %I OWNER %I', :'dbname', :'owner')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'dbname')\gexec
SQL
echo "database '$MLFLOW_DB' ready for MLflow"
