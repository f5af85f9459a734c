#!/bin/bash
# EVE-Base, paper setting: 16 A100 (2 nodes x 8), config eve_base_4m. Submit from the repository root;
# see slurm/README.md.
#   sbatch slurm/pretrain_base.sh --run-dir runs/eve_base_4m
#   sbatch --nodes=4 slurm/pretrain_base.sh --run-dir runs/base_32gpu train.micro_batch_size=64
# The paper starts from BEiT v2: once, convert timm's beitv2_base_patch16_224 weights and point EVE_BEITV2_BASE at them
#   eve-convert import-beitv2 --model eve_base beitv2_base_patch16_224.pth $EVE_DATA_ROOT/init/eve_base_beitv2
#   export EVE_BEITV2_BASE=$EVE_DATA_ROOT/init/eve_base_beitv2   (or pass train.init_from=PATH | none)
# The launcher runs `eve-pretrain --dry-run` first: a missing path fails in seconds.
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
