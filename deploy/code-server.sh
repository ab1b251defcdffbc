#!/bin/sh
# Entry point of the Dagster code server: first DAGSTER_HOME/dagster.yaml, generated from the RECSYS_*
# settings as `recsys run` and `recsys ui` generate it (the instance in RECSYS_POSTGRES_URL's database); then
# the gRPC server of the recsys code location, which also executes the runs the daemon launches. The
# webserver and the daemon start once this server is healthy, so they find the file written.
set -eu
python - <<'PYTHON'
from recsys_core.settings import load_settings
from recsys_dagster.runner import write_instance_config

write_instance_config(load_settings())
PYTHON
exec dagster code-server start --host 127.0.0.1 --port "${DAGSTER_CODE_SERVER_PORT:?}" \
    --module-name recsys_dagster.definitions --location-name recsys
