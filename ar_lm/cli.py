"""`ar-lm` command line: it only parses and dispatches; each command lives with its concern.

Every user mistake is one line on stderr and exit status 2; `--debug` shows tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from pathlib import Path

from ar_lm.errors import EXIT_FAILURE, EXIT_NONFINITE, EXIT_USAGE, NonFiniteError, UserError

COMPILING = ("train", "cooldown", "eval", "generate", "lm-eval", "compress", "decompress")  # they keep JAX's persistent compilation cache
RUN_DIR_HELP = "a run directory (written by `ar-lm train` or `ar-lm import-hf`); its latest checkpoint"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints usage too)
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _prepare(p) -> None:
    p.add_argument("--source", choices=("stdlib", "files", "synthetic", "chat", "images", "audio"), required=True,
                   help="what to tokenize: the standard library's .py files, your files, a Markov chain, ...")
    p.add_argument("--chat-template", metavar="NAME|tokenizer_config.json", help="chat: chatml, llama3, gemma or a "
                   "Hugging Face tokenizer_config.json's chat_template (conversations: .jsonl of {\"messages\": [...]})")
    p.add_argument("--files", nargs="*", default=[], help="files, globs or directories (.txt/.jsonl/.parquet; "
                   "images: PNG/JPEG; audio: WAV), each file read once; with --val-files: the train split; a few "
                   "text files alone are cut into documents for the val split")
    p.add_argument("--val-files", nargs="*", default=[], help="the val split's files (no hash split then)")
    p.add_argument("--test-files", nargs="*", default=[], help="a test split's files")
    p.add_argument("--tokenizer", choices=("sentencepiece", "byte", "char"), help="text sources (default byte)")
    p.add_argument("--tokenizer-from", metavar="DATA_DIR", help="use this dataset's tokenizer instead of training "
                   "one (the same tokens: e.g. for data.eval_sets); --files may then be left out")
    p.add_argument("--vocab-size", type=int, default=0, help="sentencepiece (required; a small corpus "
                   "may give fewer, said and recorded in metadata.json) or char (cap)")
    p.add_argument("--sp-model-type", choices=("bpe", "unigram"), default="bpe", help="sentencepiece's algorithm")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents hashed to val "
                   "(without --val-files)")
    p.add_argument("--max-mb", type=float, default=0.0, help="stop reading the (train) source after this many MB "
                   "(default 0: all)")
    p.add_argument("--buffer-mb", type=float, default=64.0, help="text held in memory at once while tokenizing "
                   "(peak memory: the interpreter's + at most twice this)")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (default 0: one per core for corpora over 4 M characters, "
                   "except with the byte tokenizer; 1: this process)")
    p.add_argument("--out", required=True, help="dataset directory to create (must not exist or be empty)")
    p.add_argument("--synthetic-tokens", type=int, default=2_000_000, help="synthetic: train tokens")
    p.add_argument("--synthetic-vocab", type=int, default=32, help="synthetic: symbols")
    p.add_argument("--synthetic-order", type=int, default=3, help="synthetic: Markov order k")
    p.add_argument("--synthetic-branching", type=int, default=4, help="synthetic: successors per context")
    p.add_argument("--seed", type=int, default=0, help="synthetic: source seed")
    p.add_argument("--size", metavar="HxW", help="images: resize every image to H x W (default: their own size)")
    p.add_argument("--channels", type=int, help="images: 1 (grayscale) or 3 (RGB) (default: the images' own)")
    p.add_argument("--bits", type=int, help="images: 2^bits intensity levels, 1..8 (default 8)")
    p.add_argument("--npz", metavar="FILE", help="images: a .npz array [N, H, W] or [N, H, W, C] (uint8) instead of files")
    p.add_argument("--npz-key", help="images: the array in --npz (default: the first)")
    p.add_argument("--sample-rate", type=int, help="audio: resample to R Hz (default 16000)")
    p.add_argument("--mu-law", type=int, help="audio: mu-law codes (default 256, 8 bits)")


def _experiment(p, run_dir: bool = True) -> None:
    p.add_argument("experiment", help="experiment file (e.g. experiments/tiny.py) or a resolved config.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    if run_dir:
        p.add_argument("--data", help="dataset directory (overrides data.path)")
        p.add_argument("--run-dir", help="run directory (default: runs/<experiment name>)")


def _train(p) -> None:
    _experiment(p)
    p.add_argument("--coordinator", help="multi-process: HOST:PORT of process 0 (auto on TPU pods and Slurm)")
    p.add_argument("--num-processes", type=int, help="multi-process: number of processes")
    p.add_argument("--process-id", type=int, help="multi-process: this process's index")
    p.add_argument("--init-timeout", type=int, default=120, help="seconds to wait for all processes to join")


def _cooldown(p) -> None:
    p.add_argument("trunk_dir", help="a constant or wsd run with checkpoints at the branch points")
    p.add_argument("--at-tokens", type=int, required=True, help="the branch's total token budget D")
    p.add_argument("--run-dir", required=True, help="the branch's run directory (new, or the branch to resume)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--cooldown-frac", type=float, help="cooldown length as a fraction of D (default: the trunk's)")
    group.add_argument("--cooldown-steps", type=int, help="cooldown length in steps")


def _eval(p) -> None:
    p.add_argument("run_dir", help=RUN_DIR_HELP)
    p.add_argument("--data", help="dataset directory (default: the run's own)")
    p.add_argument("--split", default="val", help="split to score: val (default) or test")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--all", action="store_true", help="score the whole split in strided windows (the default)")
    scope.add_argument("--batches", type=int, help="score N batches of the seeded window subset training evaluates")
    scope.add_argument("--tokens", type=int, help="score T tokens of the seeded window subset (0: up to the cap)")
    p.add_argument("--stride", type=int, help="whole split: window stride S <= data.seq_len (default seq_len); "
                   "every token is scored once with >= seq_len - S tokens of context")
    p.add_argument("--exposure", type=int, metavar="K", help="exposure bias on the seeded subset: the true tokens "
                   "K+1.. scored after the model's own greedy first K versus the true ones (exposure_gap)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _sweep(p) -> None:
    from ar_lm.parallel.launch import settings_from_env

    env = settings_from_env()
    p.add_argument("experiment", help="experiment file defining sweep(), e.g. experiments/isoflop_cpu.py")
    p.add_argument("--sweep-dir", help="default: sweeps/<sweep name>")
    p.add_argument("--data", help="dataset directory (default: made from the sweep's DataSpec in SWEEP_DIR/data)")
    p.add_argument("--executor", choices=("local", "ray", "slurm"), default="local",
                   help="local: this machine (or a TPU pod with --launcher tpu); ray: Ray tasks; slurm: job arrays")
    p.add_argument("--max-concurrent", type=int, default=1, help="points running at once (default 1: one at a time)")
    p.add_argument("--devices", type=int, help="local: devices to pack points onto (default: this machine's GPUs, "
                   "TPU chips or CPU cores; on CPU any number of fake host devices)")
    p.add_argument("--flops-per-device", type=float, help="devices per point = the power of two >= C_run / F")
    p.add_argument("--ray-address", help="ray: HOST:PORT of a running cluster (default: start a local instance)")
    p.add_argument("--max-retries", type=int, default=2, help="ray: retries of a point whose worker died")
    p.add_argument("--slurm-cluster", choices=("slurm", "local"), default="slurm",
                   help="slurm: submit with sbatch, or run the arrays as local processes (submitit's LocalExecutor)")
    p.add_argument("--slurm-partition", default=env["partition"], help="slurm: partition")
    p.add_argument("--slurm-time", type=int, default=24 * 60, help="slurm: time limit per point, minutes")
    p.add_argument("--slurm-cpu", action="store_true", help="slurm: CPU-only points (no --gpus-per-node)")
    p.add_argument("--launcher", choices=("local", "tpu"), default="local",
                   help="tpu: run the points on a TPU pod's workers, placed by chips, coordinated from here")
    p.add_argument("--tpu-name", default=env["name"], help="tpu: TPU VM name, or NAME,NAME,... for several slices")
    p.add_argument("--tpu-zone", default=env["zone"], help="tpu: zone")
    p.add_argument("--tpu-accelerator", default=env["accelerator"], help="tpu: e.g. v4-32, v5litepod-16")
    p.add_argument("--tpu-project", default=env["project"], help="tpu: Google Cloud project")
    p.add_argument("--status", action="store_true", help="print the sweep's progress table from its directory and exit")
    p.add_argument("--dry-run", action="store_true", help="print the points and what would run where, run nothing")
    p.add_argument("--only", help="run only points whose name matches this glob (no fit)")
    p.add_argument("--plan", metavar="TOPOLOGY", help="run nothing: compile every point for this TPU topology or "
                   "accelerator type and print whether it fits, GiB per device, step time and chip-hours (plan.json)")
    p.add_argument("--plan-slices", type=int, default=1, help="--plan: slices over DCN")
    p.add_argument("--no-fit", action="store_true", help="skip the fit, plots and held-out runs")
    p.add_argument("--lm-eval-tasks", help="lm-eval tasks (comma-separated) to run on each finished point once; "
                   "their metrics become summary.csv columns lm_eval/<task>/<metric> (needs ar_lm[eval])")
    p.add_argument("--lm-eval-include-path", help="folder of local lm-eval task YAML files")
    p.add_argument("--lm-eval-limit", type=int, help="at most N examples per task")


def _plan(p) -> None:
    _experiment(p, run_dir=False)
    p.add_argument("--data", help="dataset directory (its vocabulary, when model.vocab_size is 0)")
    p.add_argument("--target", required=True, metavar="TOPOLOGY", help="a TPU topology (v5e:2x2, v5p:4x4x8, "
                   "v4:2x2x2, v6e:8x8) or accelerator type (v5p-128, v5litepod-16, v4-32, v6e-64)")
    p.add_argument("--slices", type=int, default=1, help="slices over DCN (multi-slice; default 1)")
    p.add_argument("--decode", action="store_true", help="plan one decode step (batch data.batch_size, a cache of "
                   "model.max_seq_len) instead of the train step")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--hlo-dir", help="write the compiled HLO text here")


def _fit(p) -> None:
    p.add_argument("sweep_dir", nargs="?", help="a sweep directory (or give --points)")
    p.add_argument("--points", help="CSV with columns params,tokens,loss or params,flops,loss")
    p.add_argument("--out", help="output directory for fit.json and plots (default: SWEEP_DIR/fit or next to the CSV)")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for confidence intervals")
    p.add_argument("--approach", type=int, action="append", choices=(1, 2, 3), help="repeatable; default: all")
    p.add_argument("--forms", "--form", default="chinchilla,kaplan,frontier,frontier:E=0,gadre", help="law forms fitted "
                   "side by side (chinchilla, kaplan, frontier, frontier:E=VALUE, gadre, muennighoff; comma-separated)")
    p.add_argument("--select", default="rollout", choices=("rollout", "first"), help="the law that predicts: the best "
                   "under rollout cross-validation over the budgets (and intervals calibrated on it), or the first form")
    p.add_argument("--curves", action="store_true", help="also fit each size's loss curves (multi-power law)")
    p.add_argument("--task", action="append", metavar="lm_eval/TASK/METRIC", help="repeatable: a downstream-task law "
                   "(task loss from N, D; the metric from task loss) fitted on summary.csv's column")
    p.add_argument("--task-loss", default="val_loss", help="the --task laws' intermediate loss column")
    p.add_argument("--flops-model", default="6nd", choices=("6nd", "exact"), help="the CSV's flops: 6ND or exact")
    p.add_argument("--attention-flops", default="causal", choices=("causal", "full"), help="count attention FLOPs "
                   "causal-halved (default, as runs record them) or over the full L x L square as Chinchilla does")
    p.add_argument("--full-grid", action="store_true", help="approach 3 from every grid start (default: the best 64)")
    p.add_argument("--include-repeated", action="store_true", help="also fit points past 1 epoch of their train split")
    p.add_argument("--test", help="CSV of held-out points (same columns as --points): predict each with an interval")
    p.add_argument("--predict", nargs="+", metavar="N:D", help="predict the loss at these sizes and token counts")
    p.add_argument("--predict-compute", nargs="+", type=float, metavar="C", help="compute-optimal N, D, loss at C")
    p.add_argument("--holdout-above", type=float, metavar="C", help="backtest: fit below C, predict the rest")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compute multiplier of B over A (sweeps or CSVs)")


def _fit_lr(p) -> None:
    p.add_argument("sweep_dir", help="a sweep directory of an lr_sweep")
    p.add_argument("--out", help="the fitted rule (default: SWEEP_DIR/lr_fit.json; HParamRule.from_fit loads it)")
    p.add_argument("--bootstrap", type=int, default=200, help="parametric bootstrap replicates")


def _compare(p) -> None:
    p.add_argument("runs", nargs="+", help="run or sweep directories")
    p.add_argument("--out", default="compare.png", help="plot file (PNG)")


def _launch(p) -> None:
    from ar_lm.parallel.launch import DEFAULTS, settings_from_env

    env = settings_from_env()
    p.add_argument("launcher", choices=("local", "tpu", "slurm"), help="where the command runs")
    p.add_argument("--dry-run", action="store_true", help="print the exact commands, run nothing")
    p.add_argument("--processes", type=int, default=DEFAULTS["processes"], help="local: processes")
    p.add_argument("--devices-per-process", type=int, default=DEFAULTS["devices_per_process"], help="local")
    p.add_argument("--timeout", type=float, default=DEFAULTS["timeout"], help="local: seconds before the run is stopped")
    p.add_argument("--name", default=env["name"], help="tpu: TPU VM name")
    p.add_argument("--zone", default=env["zone"], help="tpu: zone")
    p.add_argument("--accelerator", default=env["accelerator"], help="tpu: e.g. v5litepod-16")
    p.add_argument("--version", default=env["version"], help="tpu: runtime")
    p.add_argument("--project", default=env["project"], help="tpu: Google Cloud project")
    p.add_argument("--spot", action="store_true", help="tpu: preemptible (spot) capacity")
    p.add_argument("--queued", action="store_true", help="tpu: create through queued resources")
    p.add_argument("--queued-timeout", type=float, default=3600.0, help="tpu: seconds to wait for it to be ACTIVE")
    p.add_argument("--nodes", type=int, default=env["nodes"], help="slurm: nodes")
    p.add_argument("--gpus-per-node", type=int, default=env["gpus_per_node"], help="slurm")
    p.add_argument("--partition", default=env["partition"], help="slurm: partition")
    p.add_argument("--time", default=DEFAULTS["time"], help="slurm: time limit")
    p.add_argument("--job-name", default=DEFAULTS["job_name"], help="slurm: job name")
    p.epilog = "After the options: -- and the ar-lm command to run."


def _generate(p) -> None:
    p.add_argument("run_dir", help=RUN_DIR_HELP)
    p.add_argument("--prompt", help="text to continue (starts a new document)")
    p.add_argument("--chat", action="store_true", help="a conversation: user turns from stdin line by line, each "
                   "reply printed, the KV cache reused across turns (the run's chat template)")
    p.add_argument("--chat-template", metavar="NAME|tokenizer_config.json",
                   help="--chat: the template (default: the one the run's data was prepared with)")
    p.add_argument("--system", metavar="TEXT", help="--chat: a system message that opens the conversation")
    p.add_argument("--prompt-ids", help="token ids to continue, e.g. '464, 3290' (for runs without a text tokenizer)")
    p.add_argument("--eos-id", type=int, help="stop at this token id (default: the tokenizer's end of document)")
    p.add_argument("--max-new-tokens", type=int, help="default: 64, or what fits in the context; more slides the "
                   "window: each token past the context sees the last max_seq_len - 1 tokens")
    p.add_argument("--temperature", type=float, help="default 1 (the model's distribution); 0 = greedy")
    p.add_argument("--top-k", type=int, help="sample from the K most likely tokens")
    p.add_argument("--top-p", type=float, help="nucleus sampling: the smallest set with mass >= P (0 < P <= 1)")
    p.add_argument("--min-p", type=float, help="keep tokens with p >= M * p_max")
    p.add_argument("--beams", type=int, default=1, help="beam search with B beams; prints the n-best list")
    p.add_argument("--length-penalty", type=float, default=0.6, help="beam search GNMT alpha")
    p.add_argument("--draft", help="draft RUN_DIR (same tokenizer) for speculative decoding")
    p.add_argument("--draft-tokens", type=int, default=4, help="speculative: tokens proposed per target pass")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples (not streamed when > 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--json", action="store_true", help="print JSON with tokens and log-probs instead of text")
    p.add_argument("--image-out", help="image run: write --num-samples whole images as one grid PNG here")
    p.add_argument("--prompt-image", help="image run: complete this image's top --prompt-rows rows")
    p.add_argument("--prompt-rows", type=int, help="with --prompt-image: rows given (1 <= R < the height)")
    p.add_argument("--audio-out", help="audio run: write --seconds of audio as a 16-bit mono WAV here")
    p.add_argument("--seconds", type=float, help="with --audio-out: length of the audio (may exceed the context)")
    p.add_argument("--quantize", choices=("int8",), help="int8: weight-only int8 matmul weights (per output "
                   "channel, float32 scales), quantised once at load (default: float32 as trained)")


def _lm_eval(p) -> None:
    p.add_argument("run_dir", help=RUN_DIR_HELP)
    p.add_argument("--tasks", required=True, help="lm-eval task names (or globs) separated by commas")
    p.add_argument("--include-path", help="folder of task YAML files (local tasks), searched before lm-eval's own")
    p.add_argument("--limit", type=int, help="at most N examples per task (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    p.add_argument("--json", action="store_true", help="print the step and the metrics as JSON")


def _codec(verb: str):
    def add(p) -> None:
        p.add_argument("run_dir", help="the run whose model codes the file (its latest checkpoint)")
        p.add_argument("input", metavar="IN", help=f"the file to {verb}")
        p.add_argument("output", metavar="OUT", help="the file to write (must not exist)")
    return add


def _positionals(*pairs):
    return lambda p: [p.add_argument(name, help=text) for name, text in pairs]


# command -> (help, argument builder, module, function); the module is imported only when its command runs
COMMANDS = {
    "prepare": ("tokenize a text, image or audio source into a dataset directory", _prepare, "ar_lm.data.prepare", "prepare_command"),
    "train": ("train (or resume) an experiment", _train, "ar_lm.training.command", "train_command"),
    "cooldown": ("branch a WSD cooldown for budget D from a constant-lr trunk's checkpoint", _cooldown,
                 "ar_lm.training.command", "cooldown_command"),
    "eval": ("score a run's latest checkpoint on a split: loss, perplexity, bits per byte/char", _eval,
             "ar_lm.training.evaluate", "eval_command"),
    "sweep": ("run an experiment's sweep (resumable), then fit and plot", _sweep, "ar_lm.scaling.runner",
              "sweep_command"),
    "plan": ("compile a run for a TPU topology ahead of time: memory, FLOPs, collectives, step time (needs "
             "ar_lm[tpu])", _plan, "ar_lm.plan.command", "plan_command"),
    "fit": ("fit scaling laws to a sweep directory or a CSV of points", _fit, "ar_lm.scaling.report", "fit_command"),
    "fit-lr": ("fit per-size optimal learning rates of an lr sweep and the rule lr*(N)", _fit_lr,
               "ar_lm.scaling.hparams", "fit_lr_command"),
    "compare": ("table and plot of val perplexity / bits per byte across runs", _compare, "ar_lm.scaling.compare",
                "compare_command"),
    "launch": ("run an ar-lm command on a TPU pod, a Slurm cluster or N local processes", _launch,
               "ar_lm.parallel.launch", "launch_command"),
    "generate": ("generate text (streamed), images or audio from a run's latest checkpoint", _generate,
                 "ar_lm.decoding.command", "generate_command"),
    "lm-eval": ("run lm-evaluation-harness tasks on a run's latest checkpoint (needs ar_lm[eval])", _lm_eval,
                "ar_lm.decoding.harness_command", "lm_eval_command"),
    "compress": ("compress a file by range coding with a run's next-token distributions (needs ar_lm[compress])",
                 _codec("compress"), "ar_lm.decoding.compress_command", "compress_command"),
    "decompress": ("decompress a file `ar-lm compress` wrote, with the same run", _codec("decompress"),
                   "ar_lm.decoding.compress_command", "decompress_command"),
    "import-hf": ("import a Hugging Face GPT-2 / Llama directory as an ar_lm run", _positionals(
        ("hf_dir", "a Hugging Face model directory (config.json + weights)"), ("run_dir", "the run directory to create")),
        "ar_lm.interop.hf", "import_hf_command"),
    "export-hf": ("export a run as a Hugging Face directory (config.json + safetensors)", _positionals(
        ("run_dir", RUN_DIR_HELP), ("out_dir", "the Hugging Face directory to write")), "ar_lm.interop.hf",
        "export_hf_command"),
    "config": ("print an experiment's resolved config as JSON", lambda p: _experiment(p, run_dir=False),
               "ar_lm.training.command", "config_command"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ar-lm", description="Autoregressive LM scaling experiments in JAX.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for name, (help_text, add_arguments, _, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        add_arguments(p)
        p.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """Parsed arguments; for `launch ... -- COMMAND`, COMMAND (not ours to parse) is `cmd_args`."""
    rest: list[str] = []
    if "launch" in argv[:2] and "--" in argv:
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    args.cmd_args = rest
    if not args.command:
        raise UserError("no command given: use one of " + ", ".join(COMMANDS) + " (see `ar-lm --help`)")
    return args


# command -> its arguments that name an existing run directory to read
READS_RUN_DIR = {**dict.fromkeys(("eval", "lm-eval", "compress", "decompress", "export-hf"), ("run_dir",)),
                 "generate": ("run_dir", "draft"), "cooldown": ("trunk_dir",)}


def check_run_dirs(args: argparse.Namespace) -> None:
    """Every run directory the command reads holds a config.json: one message for every command."""
    for name in READS_RUN_DIR.get(args.command, ()):
        path = getattr(args, name, None)
        if path is not None and not (Path(path) / "config.json").is_file():
            what = "does not exist" if not Path(path).exists() else "is not an ar_lm run directory (no config.json)"
            raise UserError(f"{path} {what}: pass a directory written by `ar-lm train` (or `ar-lm import-hf`)")


def dispatch(args: argparse.Namespace) -> int:
    check_run_dirs(args)
    if args.command in COMPILING or args.command in ("plan", "sweep"):
        from ar_lm.parallel.runtime import set_backend_xla_flags

        set_backend_xla_flags()  # before any backend starts
    if args.command in COMPILING:
        from ar_lm.parallel.runtime import enable_compilation_cache

        enable_compilation_cache()
    _, _, module, function = COMMANDS[args.command]
    return getattr(importlib.import_module(module), function)(args)


def _closed_pipe() -> int:
    """stdout's reader went away (`ar-lm config X | head -1`): stop quietly with 141, as `yes | head` does."""
    with contextlib.suppress(OSError, ValueError):  # what is still buffered goes nowhere: exit's flush succeeds
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 128 + 13  # killed by SIGPIPE


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    if not debug:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    try:
        code = dispatch(parse(argv))
        sys.stdout.flush()  # a reader that went away shows here, not in the flush at exit
        return code
    except BrokenPipeError:
        return _closed_pipe()
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the non-user failures still get one line without --debug
        if debug:
            raise
        print(f"error: {type(e).__name__}: {e} (rerun with --debug for a traceback)", file=sys.stderr)
        return EXIT_NONFINITE if isinstance(e, NonFiniteError) else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
