#!/usr/bin/env bash
# Submit an SDFT training run to a running Ray cluster through the Ray Jobs API.
#
#   scripts/submit_job.sh [ray-job-submit options] CONFIG [--set a.b=c ...] [--resume latest|PATH]
#
# Runs, from the repository root:
#
#   RAY_AUTH_MODE=token ray job submit --address $RAY_ADDRESS --working-dir . \
#       --runtime-env-json '{"excludes": [".venv*", "runs", ".git", ...]}' \
#       -- python -m sdft_ray.cli train CONFIG [--set ...]
#
# The repository is uploaded as the job's working directory (without virtual environments, run and
# result folders, git history and caches), so the cluster needs only the installed dependencies (see
# deploy/Dockerfile). Everything after CONFIG goes to `sdft_ray.cli train` unchanged. Options
# before CONFIG go to `ray job submit`, e.g. --no-wait or --submission-id ID; without --no-wait
# the script follows the job's logs and exits 0 only if the job SUCCEEDED.
#
# Environment:
#   RAY_ADDRESS   the cluster's job API (default http://127.0.0.1:8265). Keep it on loopback: a
#                 local head started with --dashboard-host 127.0.0.1, or a Kubernetes head reached
#                 with `kubectl port-forward svc/<head-svc> 8265:8265`. See docs/deployment.md.
#   RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH
#                 the cluster's token; default ~/.ray/auth_token (written by `ray start` on this
#                 machine). Token authentication stays on: the script always sets RAY_AUTH_MODE=token.
#   JOB_PYTHON    the interpreter the job runs on the cluster (default: python on the head's PATH)
#   RAY           the ray CLI to use here (default: ray on PATH)
#
# Anyone who can reach a Ray cluster's job API can run arbitrary code on it: never expose
# port 8265 beyond loopback (or a cluster-internal network) and never disable authentication.
set -euo pipefail

usage() {
  sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

cd "$(dirname "$0")/.."

ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
RAY_CLI=${RAY:-ray}
JOB_PYTHON=${JOB_PYTHON:-python}
# gitignore-style patterns, relative to the working directory.
EXCLUDES='".venv*", "venv", "runs", "outputs", "results", ".git", "__pycache__", "*.pyc", ".pytest_cache", ".hypothesis",'
EXCLUDES+=' ".cache", "*.egg-info", "build", "dist"'
RUNTIME_ENV_JSON="{\"excludes\": [$EXCLUDES]}"

# Options for `ray job submit` come before the config; those listed here take a value.
submit_opts=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage ;;
    --submission-id|--metadata-json|--entrypoint-num-cpus|--entrypoint-num-gpus|--entrypoint-memory|\
    --entrypoint-resources|--entrypoint-label-selector|--headers|--log-style|--log-color|--verify)
      [ $# -ge 2 ] || usage
      submit_opts+=("$1" "$2"); shift 2 ;;
    --*) submit_opts+=("$1"); shift ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || usage
CONFIG=$1
shift
if [ ! -f "$CONFIG" ]; then
  echo "error: config $CONFIG not found (give a path inside the repository, e.g. configs/tiny_job.yaml)" >&2
  exit 2
fi

case "$ADDRESS" in
  http://127.0.0.1:*|http://localhost:*|http://\[::1\]:*) ;;
  *) echo "warning: RAY_ADDRESS=$ADDRESS is not loopback; the token travels unencrypted unless it is https." \
          "Prefer a loopback address (kubectl port-forward, ssh -L)." >&2 ;;
esac

export RAY_AUTH_MODE=token
exec "$RAY_CLI" job submit --address "$ADDRESS" --working-dir . --runtime-env-json "$RUNTIME_ENV_JSON" \
  "${submit_opts[@]+"${submit_opts[@]}"}" -- "$JOB_PYTHON" -m sdft_ray.cli train "$CONFIG" "$@"
