#!/usr/bin/env bash
# slurm launcher: see `ar-lm launch slurm --help` and docs/howto/slurm.md.
exec python3 -m ar_lm launch slurm "$@"
