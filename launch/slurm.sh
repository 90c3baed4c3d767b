#!/usr/bin/env bash
# slurm launcher: see `ar-lm launch slurm --help` and README "Scale-out".
exec python3 -m ar_lm launch slurm "$@"
