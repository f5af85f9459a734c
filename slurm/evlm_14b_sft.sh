#!/bin/bash
# EVLM stage 3 (SFT -> EVLM-Chat): config evlm_14b_sft, 16 GPUs (2 nodes x 8, [ours]).
# Submit from the repository root; see slurm/README.md and docs/evlm.md ("Full-scale stages").
#   export EVLM_LM_PATH=/models/Qwen1.5-14B-Chat EVLM_VIT_PATH=/models/eva02_enormous_laion2b_plus.safetensors
#   EVLM_CPT_RUN=runs/evlm_cpt sbatch slurm/evlm_14b_sft.sh --run-dir runs/evlm_sft
# The launcher runs `eve-pretrain --dry-run` first: a missing file or an unset variable fails in seconds.
#SBATCH --job-name=evlm-sft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@600
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
exec "${EVE_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" --config evlm_14b_sft "$@"
