#!/bin/sh
# preStop hook (deploy/base: both containers; deploy/kserve: the predictor): wait, at most
# DRAIN_TIMEOUT_S (default 840 s, inside the pod's 900 s grace period), while a live worker's
# heartbeat says busy, so a scale-down or a rolling update lets running morphs finish instead of
# cutting them. The pod is already out of the Service's endpoints by then; heartbeats of workers
# whose process is gone do not count.
workers="${DIFFMORPHER_CONTROL_DIR:?DIFFMORPHER_CONTROL_DIR is not set}/workers"
limit="${DRAIN_TIMEOUT_S:-840}"
waited=0
busy() {
  for beat in "$workers"/*.json; do
    [ -f "$beat" ] || continue
    pid="$(basename "$beat" .json)"
    if [ -d "/proc/$pid" ] && grep -q '"state": "busy"' "$beat"; then
      return 0
    fi
  done
  return 1
}
while busy && [ "$waited" -lt "$limit" ]; do
  sleep 2
  waited=$((waited + 2))
done
echo "drain: waited ${waited} s for busy workers"
