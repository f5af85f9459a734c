#!/bin/bash
# The paper's Table 2 with one command: submits the whole chain as Slurm jobs with afterok dependencies,
#   pretrain -> export -> COCO retrieval -> VQA, NLVR2, Flickr30K (in parallel) -> evaluations -> report
# every stage under RUN_ROOT (RUN_ROOT/pretrain, RUN_ROOT/export, RUN_ROOT/vqa, ..., RUN_ROOT/report.md).
#
#   slurm/reproduce.sh --size base|large|tiny [--corpus 4m|16m] --run-root DIR [--wait] [--dry-run] \
#       [KEY=VALUE ...] [STAGE:KEY=VALUE ...] [finetune:KEY=VALUE ...]
#
# Run it on a login node (not inside sbatch), in the environment where eve_ds is installed, from anywhere:
# every training config is checked first (`eve-pretrain --dry-run`), so a typo or a missing data path fails
# in seconds with nothing submitted. Rerunning the same command skips complete stages and resubmits what
# is missing or failed and what depends on it; --wait blocks until the chain ends and exits 1 naming the
# stage that failed. Training stages go through slurm/launch.sh (requeue on preemption, exact resume).
# Knobs: EVE_PYTHON (interpreter, default python), EVE_ROOT (checkout, default this one), the launcher's
# (slurm/README.md), and sbatch's own input variables (SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_QOS).
# docs/reproduce.md: the stages, their expected GPU hours, the tiny demonstration.
set -euo pipefail

EVE_ROOT=${EVE_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export EVE_ROOT
export PYTHONPATH=$EVE_ROOT${PYTHONPATH:+:$PYTHONPATH}
exec "${EVE_PYTHON:-python}" -m eve_ds.cli.reproduce reproduce "$@"
