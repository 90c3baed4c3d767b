#!/usr/bin/env bash
# tpu launcher: see `ar-lm launch tpu --help` and README "Scale-out".
exec python3 -m ar_lm launch tpu "$@"
