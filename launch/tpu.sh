#!/usr/bin/env bash
# tpu launcher: see `ar-lm launch tpu --help` and docs/howto/tpu.md.
exec python3 -m ar_lm launch tpu "$@"
