#!/usr/bin/env bash
# Submit a training run to a Ray cluster: a thin wrapper around the documented command
#
#   ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env cluster/runtime_env.yaml \
#       -- python -m trainer fit ARGS...
#
# Usage:  cluster/submit.sh [RAY JOB SUBMIT OPTIONS...] -- TRAINER FIT ARGS...
#         cluster/submit.sh TRAINER FIT ARGS...            (no `--`: every argument goes to `trainer fit`)
#
# RAY_ADDRESS defaults to http://127.0.0.1:8265, where `ray dashboard cluster/aws.yaml` (or
# `kubectl port-forward svc/<cluster>-head-svc 8265`) forwards the head's dashboard. The clusters run with
# token authentication, so RAY_AUTH_MODE defaults to token; Ray reads the token from RAY_AUTH_TOKEN,
# RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (`ray get-auth-token --generate` writes that file).
set -euo pipefail
cd "$(dirname "$0")/.."

export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

submit_opts=()
if [[ " $* " == *" -- "* ]]; then
  while [[ $1 != -- ]]; do submit_opts+=("$1"); shift; done
  shift
fi

cmd=(ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env cluster/runtime_env.yaml
     "${submit_opts[@]}" -- python -m trainer fit "$@")
printf '+ %q' "${cmd[0]}" >&2; printf ' %q' "${cmd[@]:1}" >&2; echo >&2
exec "${cmd[@]}"
