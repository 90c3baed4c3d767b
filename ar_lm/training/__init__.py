"""Training: state and its shardings, the step, the loop, optimizer, checkpoints, evaluation, metrics.

`state` (train state created sharded, abstract params), `step` (loss and the jitted train step),
`loop` (`train`: setup, the loop, the finish), `optimizer` (AdamW, the learning-rate schedules),
`branch` (WSD cooldowns branched from a trunk's checkpoint; `ar-lm cooldown`), `checkpoint` (orbax,
`restore_latest_params`), `evaluate` (loss, perplexity, bits per byte; `ar-lm eval`), `metrics`
(metrics.jsonl, wandb, MFU), `rundir` (run directory layout, lock, summary), `lifecycle` (the start line,
finished runs, wall time over resumes, `train.init_from`), `preemption`
(SIGTERM/SIGINT), `command` (`ar-lm train`, `ar-lm cooldown`). Imports the base layer,
`ar_lm.model`, `ar_lm.data` and `ar_lm.parallel`.
"""
