#!/usr/bin/env bash
# The collaborative registry, start to finish, on the built-in world:
#   a base model; 7 contributors each train a LoRA adapter on their task (one round, from the base)
#   and contribute it; one more contributor hands in a full fine-tune trained at a learning rate that
#   wipes old knowledge; the maintainer composes versions by MoE-LoRA and by TIES, the forgetting gate
#   rejects the version that takes in the harmful contribution; log, diff and the registry page show the
#   lineage and every gate check against what each version was built from.
#
#   examples/registry-scenario.sh [OUT_DIR] [PRESET] [REGISTRY]
#       defaults: runs/registry-scenario, quick, OUT_DIR/registry; REGISTRY may be a URL fsspec reaches
#       (file:///mnt/shared/reg, s3://bucket/reg), which must not hold a registry yet
#   make registry-demo                                      (the same, with the project's .venv)
#
# Everything is the knowstack CLI: each command below is what a contributor or maintainer types.
set -euo pipefail
OUT=${1:-runs/registry-scenario}
PRESET=${2:-quick}
KS=${KNOWSTACK:-knowstack}
rm -rf "$OUT" && mkdir -p "$OUT"
WORLD=$OUT/world REG=${3:-$OUT/registry}

$KS build-world --preset "$PRESET" --out "$WORLD"

$KS registry init "$REG" --base "$WORLD/model" --include-path "$WORLD/old_knowledge" \
    --old-tasks ks_country_code ks_subdivision ks_language_code ks_unicode_name

# name:task dir:metric:format, the paper's task order
for entry in stance:Stance:accuracy:trace notes:Notes:accuracy:trace summary:Summary:rouge_l:trace \
             code:Code:edit_similarity:trace quiz:Quiz:accuracy:trace simplify:Simplify:sari:trace \
             math:Math:math:math; do
    IFS=: read -r name dir metric format <<< "$entry"
    # `train` on the world's model runs the world's recipe, as the built-in study does (its config's training:
    # section, configs/builtin-quick.yaml: a constant rate of 1/3 of the base's pretraining peak, 3 epochs, batch 8).
    $KS train --model "$WORLD/model" --task "$WORLD/tasks/$dir" --format "$format" --finetune lora \
        --out "$OUT/adapters/$name"
    $KS contribute "$REG" --name "$name" --adapter "$OUT/adapters/$name" --task "$WORLD/tasks/$dir" \
        --metric "$metric" --format "$format" --keep-data --author "$name-team"
done

# The harmful contribution: a full fine-tune of stance at 30x the recipe's rate (10x the pretraining peak): what
# wipes old knowledge.
$KS train --model "$WORLD/model" --task "$WORLD/tasks/Stance" --finetune fft --lr-of-pretrain-peak 10 \
    --out "$OUT/adapters/stance-hot"
$KS contribute "$REG" --name stance-hot --model "$OUT/adapters/stance-hot" --task "$WORLD/tasks/Stance" \
    --author careless-team
$KS registry list "$REG"

GOOD="stance notes summary code quiz simplify math"
$KS compose "$REG" --method moe-lora --name v1-moe               # the 7 adapters (a full model is left out)
$KS compose "$REG" --method merge-ties --name v2-ties --contributions $GOOD
$KS compose "$REG" --method merge-ties --name v3-ties-all       # all 8: the gate decides
# The built-in study's MoE recipe (configs/builtin.yaml): routers also trained, 50 steps on 16 examples a task.
$KS compose "$REG" --method moe-lora --name v4-moe-trained --router-steps 50
$KS log "$REG" --plot "$OUT/versions.png"
$KS registry report "$REG" --out "$OUT/page"                 # one HTML page: lineage, plane, every gate check
$KS diff "$REG" v1-moe v2-ties
$KS diff "$REG" v2-ties v3-ties-all
$KS diff "$REG" v1-moe v4-moe-trained
$KS export "$REG" v1-moe --out "$OUT/export/v1-moe" --with-base
$KS advise "$REG" --max-old-loss 2%
