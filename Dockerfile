# The recsys image (target `runtime`: the Dagster code server, webserver and daemon, the API, the CLI) and
# the PostgreSQL image of the Dagster instance (target `postgres`), both on one Debian bookworm base with
# Python 3.11. docker-compose.yml builds both; docs/how-to/deploy.md explains the build inputs.
# Written for the classic builder and BuildKit alike (docker-compose 1.x builds with the classic one).

# Any Debian bookworm image whose `python3` is 3.11 with the venv module and CA certificates.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# Installs the locked dependencies and recsys itself into /opt/recsys/.venv.
FROM ${BASE_IMAGE} AS build
# Extra CA certificates (PEM files *.crt or *.pem in deploy/extra-ca/) trusted for this stage's downloads,
# for builds behind a TLS-intercepting proxy. They do not reach the runtime image.
COPY deploy/extra-ca/ /tmp/extra-ca/
RUN cat /etc/ssl/certs/ca-certificates.crt $(find /tmp/extra-ca -type f \( -name '*.crt' -o -name '*.pem' \)) \
        > /tmp/build-ca.pem
ENV SSL_CERT_FILE=/tmp/build-ca.pem \
    PIP_CERT=/tmp/build-ca.pem \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1
# The uv version the Makefile installs.
ARG UV_VERSION=0.13.8
RUN python3 -m venv /opt/uv && /opt/uv/bin/pip install --quiet uv==${UV_VERSION}
WORKDIR /opt/recsys
# Dependencies first, in a layer of their own: a change to recsys' code rebuilds only the layer below.
COPY pyproject.toml uv.lock ./
RUN /opt/uv/bin/uv sync --frozen --no-dev --extra all --no-install-project --python python3 --quiet
COPY README.md ./
COPY recsys_core recsys_core
COPY recsys_dagster recsys_dagster
COPY recsys_serving recsys_serving
COPY recsys_cli recsys_cli
COPY dbt_like_sql dbt_like_sql
RUN /opt/uv/bin/uv sync --frozen --no-dev --extra all --no-editable --python python3 --quiet

# What the services run: the virtual environment, no sources, no build tools, a user without privileges.
FROM ${BASE_IMAGE} AS runtime
# implicit's wheel links the system OpenMP runtime.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*
# RECSYS_HOME is a volume; a new volume takes the owner of this directory.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/recsys recsys \
    && mkdir -p /var/lib/recsys \
    && chown recsys:recsys /var/lib/recsys
COPY --from=build /opt/recsys/.venv /opt/recsys/.venv
COPY deploy/dagster-workspace.yaml deploy/code-server.sh /opt/recsys/
ENV PATH=/opt/recsys/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RECSYS_HOME=/var/lib/recsys \
    DAGSTER_HOME=/var/lib/recsys/dagster
USER recsys
WORKDIR /home/recsys
CMD ["recsys", "--help"]

# PostgreSQL 15 from Debian, for the Dagster instance (runs, event log, schedules).
FROM ${BASE_IMAGE} AS postgres
# Only the server binaries: the data directory is initialised by the entry point, in the volume.
RUN mkdir -p /etc/postgresql-common/createcluster.d \
    && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/recsys.conf \
    && apt-get update \
    && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data \
    && chown postgres:postgres /var/lib/postgresql/data
COPY deploy/postgres.sh /usr/local/bin/recsys-postgres
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
USER postgres
CMD ["recsys-postgres"]
