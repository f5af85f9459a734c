#!/bin/bash
# Fine-tuning on a downstream task (VQA v2, retrieval, NLVR2): one node x 8 GPUs by default, the same
# launcher as pre-training (preflight, requeue on preemption, exact resume). Submit from the repository root:
#   sbatch slurm/finetune.sh --config vqa_eve_base --run-dir runs/vqa_base train.init_from=runs/eve_base_4m
#   sbatch --nodes=2 slurm/finetune.sh --config retrieval_coco_eve_large --run-dir runs/coco_large
# The dataset paths come from the config (e.g. ${EVE_VQA_ROOT}) or task.data_root=DIR.
#SBATCH --job-name=eve-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@300
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
exec "${EVE_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" "$@"
