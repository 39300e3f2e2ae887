#!/usr/bin/env bash
# Create the process work pool that prefect.yaml's deployment `main` uses, and register the
# deployment. Run from the repository root with PREFECT_API_URL pointing at your server.
set -euo pipefail
cd "$(dirname "$0")/.."
prefect work-pool create evomerge-process --type process --overwrite
prefect --no-prompt deploy --all
echo "Start a worker on each machine that should run searches:"
echo "  prefect worker start --pool evomerge-process"
