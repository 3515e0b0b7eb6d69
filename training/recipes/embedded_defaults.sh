#!/usr/bin/env bash
# Rebuilds the embedded default predictors (runtime/engines) from nothing:
#   synthetic data -> two predictors trained side by side (one core each) -> fp16 ONNX.
# This is the exact recipe of the committed files (2-core CPU machine, ~90 min in all).
# Usage: bash training/recipes/embedded_defaults.sh WORKDIR [ENGINES_OUT]
# Training on the CPU is seeded (--seed 0, data seeds 0 / 1) but not bit-exact across
# machines, so a rebuild gives files with other sha256s and errors within training noise.
set -euo pipefail
work=${1:?usage: embedded_defaults.sh WORKDIR [ENGINES_OUT]}
out=${2:-$work/engines}
mkdir -p "$work" && cd "$work"

# 5000 training and 200 validation renders at 160 px (the predictors' working resolution),
# head yaw up to +-75 degrees; identities, expressions, jaw, gaze, light, backgrounds random.
p3dmm synth --out data/train --n 5000 --seed 0 --size 160 --yaw-max 75 --workers 2
p3dmm synth --out data/val --n 200 --seed 1 --size 160 --yaw-max 75 --workers 2

# DINOv2-structured ViT (patch 14, embed 192, depth 6) at 140 px = 10x10 tokens, head E=128;
# trained from scratch (no pretrained weights are available offline), occluders and photo
# augmentations on. --resume makes an interrupted run continue.
common=(--data data/train --val data/val --steps 9000 --batch-size 8 --backbone mini --img-size 160
        --head-dim 128 --head-depth 1 --head-heads 4 --lr 3e-4 --backbone-lr-ratio 1 --warmup 300
        --weight-decay 0.01 --loss l1 --workers 1 --log-every 100 --val-every 1000 --val-max-samples 100
        --ckpt-every 500 --seed 0 --no-tensorboard --resume)
OMP_NUM_THREADS=1 p3dmm train --task normals --out runs/normals "${common[@]}" > normals.log 2>&1 &
OMP_NUM_THREADS=1 p3dmm train --task uv --mask-channel --out runs/uv "${common[@]}" > uv.log 2>&1 &
wait

# 512x512 io (the graph resamples to 160 and back), fp16 weights: about 15 MB for both.
export-engines runs/normals/last.pt runs/uv/last.pt --out "$out" --fp16-only
