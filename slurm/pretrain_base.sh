#!/bin/bash
# EVE-Base, paper setting: 16 A100 (2 nodes x 8), config eve_base_4m. Submit from the repository root;
# see slurm/README.md.
#   sbatch slurm/pretrain_base.sh --run-dir runs/eve_base_4m
#   sbatch --nodes=4 slurm/pretrain_base.sh --run-dir runs/base_32gpu train.micro_batch_size=64
#SBATCH --job-name=eve-base
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@300
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
exec "${EVE_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" --config eve_base_4m "$@"
