#!/bin/sh
# The KServe predictor's command (our runtime, deploy/kserve/servingruntime.yaml): TorchServe and
# the guard in the one container KServe gives a model. So a KServe replica is what a deploy/base
# pod is: clients reach only the guard's gateway (native gRPC and the Open Inference Protocol's
# inference.GRPCInferenceService on 7070, which the runtime declares as its h2c port), with its
# deadlines, cancellation, stream/unary protection, watchdog, token rotation, client tokens and
# /healthz, /livez.
#
# Paths (environment, defaults for the pod):
#   DIFFMORPHER_TS_CONFIG      TorchServe's config.properties (the image's deploy/kserve copy)
#   DIFFMORPHER_MODEL_ROOT     where KServe mounted storageUri (/mnt/models; the .mar is in model-store/)
#   DIFFMORPHER_RUN_DIR        TorchServe's start directory: key_file.json, logs/, control/
#   DIFFMORPHER_CLIENT_TOKENS  the mounted client-token Secret (guard --client-tokens)
# Arguments (our runtime passes none; an InferenceService's model `args` are appended) are
# ignored, and said so.
# The container ends when either process ends (the kubelet restarts it); SIGTERM stops both,
# after the preStop hook (drain.sh) let running morphs finish.
set -eu

config="${DIFFMORPHER_TS_CONFIG:-/srv/diffmorpher/deploy/kserve/config.properties}"
model_root="${DIFFMORPHER_MODEL_ROOT:-/mnt/models}"
run_dir="${DIFFMORPHER_RUN_DIR:-/run/diffmorpher}"
client_tokens="${DIFFMORPHER_CLIENT_TOKENS:-/var/run/secrets/diffmorpher/client-tokens}"
startup_s="${DIFFMORPHER_STARTUP_TIMEOUT_S:-600}"
export DIFFMORPHER_CONTROL_DIR="${DIFFMORPHER_CONTROL_DIR:-$run_dir/control}"

log() { echo "kserve-entrypoint: $*" >&2; }
[ "$#" -eq 0 ] || log "ignoring the runtime's arguments: $*"
mkdir -p "$run_dir" "$DIFFMORPHER_CONTROL_DIR"
cd "$run_dir"
rm -f key_file.json

torchserve --start --foreground --ncs --ts-config "$config" --model-store "$model_root/model-store" &
torchserve_pid=$!

# With token authorization on, TorchServe writes key_file.json at start; the guard reads it.
if ! grep -q '^disable_token_authorization=true' "$config"; then
  waited=0
  until [ -s key_file.json ]; do
    kill -0 "$torchserve_pid" 2>/dev/null || { log "TorchServe exited before writing its key file"; exit 1; }
    [ "$waited" -lt "$startup_s" ] || { log "no key file after $startup_s s"; kill "$torchserve_pid"; exit 1; }
    sleep 1
    waited=$((waited + 1))
  done
fi

python -m guard --ts-config "$config" --key-file "$run_dir/key_file.json" --client-tokens "$client_tokens" &
guard_pid=$!

stopping=0
failed=0
stop() {
  stopping=1
  kill -TERM "$guard_pid" 2>/dev/null || true
  # The Java frontend (pid file in TMPDIR), waiting up to 60 s for it and its workers to end.
  torchserve --stop --foreground >/dev/null 2>&1 || true
  kill -TERM "$torchserve_pid" 2>/dev/null || true
}
trap stop TERM INT

while [ "$stopping" -eq 0 ] && kill -0 "$torchserve_pid" 2>/dev/null && kill -0 "$guard_pid" 2>/dev/null; do
  sleep 1 &
  wait $! || true
done
if [ "$stopping" -eq 0 ]; then
  failed=1
  log "$(kill -0 "$guard_pid" 2>/dev/null && echo TorchServe || echo the guard) exited; stopping"
  stop
fi
wait "$guard_pid" 2>/dev/null || true
wait "$torchserve_pid" 2>/dev/null || true
exit "$failed"
