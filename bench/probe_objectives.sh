#!/usr/bin/env bash
# Pretrain -> export -> probe, with the commands users run (omnissl fit / export / probe), for the image and text
# objectives' small CPU recipes on the embedded corpora; the speech objectives have bench/learning_check.py.
#   bash bench/probe_objectives.sh [STEPS]         (default 600; writes runs/probe_objectives/<recipe>/)
# Each probe prints the pretrained encoder, the same architecture at random init (seed 0) and the non-learned
# baseline (pixels / bag of tokens); the table is in runs/probe_objectives/<recipe>/report/probe.md.
set -euo pipefail
STEPS=${1:-600}
OMNISSL=${OMNISSL:-.venv/bin/omnissl}
OUT=runs/probe_objectives
for recipe in image/mae_tiny_cpu image/data2vec_tiny_cpu image/data2vec2_tiny_cpu; do
  dir=$OUT/$recipe
  rm -rf "$dir"
  "$OMNISSL" fit -c recipes/trainer/cpu.yaml -c recipes/$recipe.yaml --trainer.max_steps "$STEPS" \
    --trainer.logger.init_args.mode csv \
    --trainer.default_root_dir "$dir" --trainer.logger.init_args.save_dir "$dir" --trainer.enable_progress_bar false
  "$OMNISSL" export "$(ls -t "$dir"/*/checkpoints/last.ckpt | head -1)" "$dir/encoder"
  "$OMNISSL" probe "$dir/encoder" --train embedded:labeled_images --test embedded:labeled_images \
    --valid embedded:labeled_images --image-size 32 --random-init --baseline --report "$dir/report" \
    | tee "$dir/probe.log"
done
