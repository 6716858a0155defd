"""Launching ssl-path stages locally or on Slurm through submitit."""
