#!/bin/sh
# Serve medgate's model repository on this machine's GPU. triton_models/ is mounted read-only at MODEL_SOURCE
# and its config.pbtxt files say KIND_CPU (the embedded default on a laptop); a copy with KIND_GPU instances
# is served instead, so each model.py asks ONNX Runtime for its CUDA provider (README, "On a GPU host").
# INSTANCE_KIND=KIND_CPU serves the repository as it is. Extra arguments go to tritonserver.
set -eu
source_dir="${MODEL_SOURCE:-/models-src}"
served="${MODEL_REPOSITORY:-/tmp/models}"
kind="${INSTANCE_KIND:-KIND_GPU}"
rm -rf "$served"
mkdir -p "$served"
cp -RL "$source_dir"/. "$served"/
find "$served" -name __pycache__ -type d -prune -exec rm -rf {} +
if [ "$kind" != KIND_CPU ]; then
    for config in "$served"/*/config.pbtxt; do
        sed -i "s/kind: KIND_CPU/kind: $kind/" "$config"
    done
fi
exec tritonserver \
    --model-repository="$served" \
    --http-port=8000 --grpc-port=8001 --metrics-port=8002 \
    --exit-timeout-secs=5 \
    "$@"
