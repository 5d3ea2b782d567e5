#!/usr/bin/env bash
# Your own data, end to end: an ImageFolder and a fine-tuned timm teacher -> a distilled student.
# Run from the folder holding data/my_images (README: "Your own data"); every path is relative.
set -euo pipefail
CFG=examples/own_data

# 1. Shards: data/my_images/{train,val}/<class>/*.jpg -> data/shards/{train,val}-*.tar + manifests
kdcache shards folder data/my_images --out data/shards --shard-size 1000

# 2. The teacher: your fine-tuned checkpoint (here one is trained with kdcache itself; skip this
#    step and set teachers.0.model.checkpoint to yours, e.g. timm train.py's model_best.pth.tar)
kdcache train $CFG/teacher.yaml

# 3. Soft targets: every teacher over 8 views per image; the teacher check runs as it goes
kdcache precompute $CFG/precompute.yaml

# 4. Look before you train: integrity, a recomputation, the teacher's statistics
kdcache validate runs/own/cache
kdcache verify runs/own/cache --num 32
kdcache inspect runs/own/cache --json runs/own/inspect.json

# 5. The student, from the cache (no teacher forward)
kdcache train $CFG/student.yaml
