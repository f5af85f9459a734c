#!/bin/bash
# EVE-Large, paper setting: 32 A100 (4 nodes x 8), config eve_large_4m (eve_large_16m: append --config
# eve_large_16m). Submit from the repository root; see slurm/README.md.
#   sbatch slurm/pretrain_large.sh --run-dir runs/eve_large_4m
#   sbatch --nodes=8 slurm/pretrain_large.sh --run-dir runs/large_64gpu   # micro-batch adapts to 32
# The paper starts from BEiT v2: once, convert timm's beitv2_large_patch16_224 weights and point EVE_BEITV2_LARGE at them
#   eve-convert import-beitv2 --model eve_large beitv2_large_patch16_224.pth $EVE_DATA_ROOT/init/eve_large_beitv2
#   export EVE_BEITV2_LARGE=$EVE_DATA_ROOT/init/eve_large_beitv2   (or pass train.init_from=PATH | none)
# The launcher runs `eve-pretrain --dry-run` first: a missing path fails in seconds.
#SBATCH --job-name=eve-large
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@300
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
exec "${EVE_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" --config eve_large_4m "$@"
