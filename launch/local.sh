#!/usr/bin/env bash
# local launcher: see `ar-lm launch local --help` and README "Scale-out".
exec python3 -m ar_lm launch local "$@"
