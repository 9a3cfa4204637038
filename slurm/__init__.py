"""SLURM job template (train.sbatch) and the local test cluster (local-cluster.sh), shipped as package data."""
