#!/bin/bash
# EVLM stage 1 (pre-training): config evlm_14b_pt, 80 GPUs (10 nodes x 8; the paper gives no GPU count: [ours]).
# Submit from the repository root; see slurm/README.md and docs/evlm.md ("Full-scale stages").
#   export EVLM_LM_PATH=/models/Qwen1.5-14B-Chat EVLM_VIT_PATH=/models/eva02_enormous_laion2b_plus.safetensors
#   sbatch slurm/evlm_14b_pt.sh --run-dir runs/evlm_pt
# The launcher runs `eve-pretrain --dry-run` first: a missing file or an unset variable fails in seconds.
#SBATCH --job-name=evlm-pt
#SBATCH --nodes=10
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --mem=0
#SBATCH --time=72:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@600
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
exec "${EVE_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" --config evlm_14b_pt "$@"
