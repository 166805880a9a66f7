#!/bin/sh
# The learning-rate/eps (and batch) grid of every forward-only recipe at 4,000 example-forwards on rt-sst2, seed 0
# (benchmarks/convergence.py). Finished points are skipped and unfinished ones resume: run it again after an
# interruption. 8 to 20 minutes a point on 2 CPU cores. Then: python benchmarks/convergence.py table
set -e
grid="${PYTHON:-.venv/bin/python} benchmarks/convergence.py grid"
$grid mezo --lr-zo 1e-5,3e-5,1e-4,3e-4 --eps 1e-3
$grid mezo --lr-zo 3e-5 --eps 1e-3 --batch-size 4  # 1e-4 at batch 4 diverged (loss 55 by step 218)
$grid mezo-sparse --lr-zo 3e-5,1e-4,3e-4 --eps 1e-3
$grid mezo-lowrank --lr-zo 1e-4,3e-4 --eps 1e-3
$grid mezo-prefix --lr-zo 1e-2,3e-2,1e-1 --eps 1e-1
$grid mezo-lora --lr-zo 3e-4,1e-3,3e-3,1e-2 --eps 1e-2
$grid mezo-momentum --lr-zo 1e-5,3e-5 --eps 1e-3
$grid fzoo --lr-zo 1e-6,3e-6,1e-5 --eps 1e-3
$grid mezo-normalized --lr-zo 1e-3,3e-3 --eps 1e-3
$grid mezo-head --lr-zo 1e-3,3e-3,1e-2 --eps 1e-2  # the head: 64 directions a step on kept features
for lr in 1e-3 3e-3 1e-2; do  # the preset's block (--head-layer 0.67 is block 20 of the default model's 30)
    ${PYTHON:-.venv/bin/python} benchmarks/convergence.py run mezo-head --set lr_zo=$lr eps=1e-2 head_layer=20 --budgets 4000
done
# mezo-nschedule and mezo-linear are still plain MeZO at 4,000: judged on their full curves only
