#!/usr/bin/env bash
# local launcher: see `ar-lm launch local --help` and docs/howto/scale-out.md.
exec python3 -m ar_lm launch local "$@"
