"""`ar-lm` command line. Every user mistake is one line on stderr and exit status 2;
`--debug` shows tracebacks."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ar_lm.errors import EXIT_USAGE, UserError

EXIT_NONFINITE = 4


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints usage too)
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ar-lm", description="Autoregressive LM scaling experiments in JAX.")
    _add_common(parser)
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("prepare", help="tokenize a text source into a dataset directory")
    p.add_argument("--source", choices=("stdlib", "files", "synthetic"), required=True)
    p.add_argument("--files", nargs="*", default=[], help="files, globs or directories (.txt/.jsonl/.parquet)")
    p.add_argument("--tokenizer", choices=("sentencepiece", "byte", "char"), default="byte")
    p.add_argument("--vocab-size", type=int, default=0, help="sentencepiece (required) or char (cap)")
    p.add_argument("--sp-model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--max-mb", type=float, default=8.0, help="stop reading the source after this many MB (0: all)")
    p.add_argument("--out", required=True, help="dataset directory to create (must not exist or be empty)")
    p.add_argument("--synthetic-tokens", type=int, default=2_000_000, help="synthetic: train tokens")
    p.add_argument("--synthetic-vocab", type=int, default=32, help="synthetic: symbols")
    p.add_argument("--synthetic-order", type=int, default=3, help="synthetic: Markov order k")
    p.add_argument("--synthetic-branching", type=int, default=4, help="synthetic: successors per context")
    p.add_argument("--seed", type=int, default=0, help="synthetic: source seed")
    _add_common(p)

    p = sub.add_parser("train", help="train (or resume) an experiment")
    p.add_argument("experiment", help="experiment file, e.g. experiments/tiny.py")
    p.add_argument("--data", help="dataset directory (overrides data.path)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--run-dir", help="run directory (default: runs/<experiment name>)")
    p.add_argument("--coordinator", help="multi-process: HOST:PORT of process 0 (auto on TPU pods and Slurm)")
    p.add_argument("--num-processes", type=int, help="multi-process: number of processes")
    p.add_argument("--process-id", type=int, help="multi-process: this process's index")
    p.add_argument("--init-timeout", type=int, default=120, help="seconds to wait for all processes to join")
    _add_common(p)

    p = sub.add_parser("eval", help="evaluate a run's latest checkpoint; prints JSON")
    p.add_argument("run_dir")
    p.add_argument("--data", help="dataset directory (default: the run's own)")
    p.add_argument("--batches", type=int, help="number of val batches (default: train.eval_batches; -1: all)")
    _add_common(p)

    p = sub.add_parser("sweep", help="run an experiment's sweep (resumable), then fit and plot")
    p.add_argument("experiment", help="experiment file defining sweep(), e.g. experiments/isoflop_cpu.py")
    p.add_argument("--sweep-dir", help="default: sweeps/<sweep name>")
    p.add_argument("--data", help="dataset directory (default: made from the sweep's DataSpec in SWEEP_DIR/data)")
    p.add_argument("--launcher", choices=("local", "tpu", "slurm"), default="local")
    p.add_argument("--dry-run", action="store_true", help="print the points and commands, run nothing")
    p.add_argument("--only", help="run only points whose name matches this glob (no fit)")
    p.add_argument("--no-fit", action="store_true", help="skip the fit, plots and held-out runs")
    _add_common(p)

    p = sub.add_parser("fit", help="fit scaling laws to a sweep directory or a CSV of points")
    p.add_argument("sweep_dir", nargs="?")
    p.add_argument("--points", help="CSV with columns params,tokens,loss or params,flops,loss")
    p.add_argument("--out", help="output directory for fit.json and plots (default: SWEEP_DIR/fit or next to the CSV)")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for confidence intervals")
    p.add_argument("--approach", type=int, action="append", choices=(1, 2, 3), help="repeatable; default: all")
    _add_common(p)

    p = sub.add_parser("compare", help="table and plot of val perplexity / bits per byte across runs")
    p.add_argument("runs", nargs="+", help="run or sweep directories")
    p.add_argument("--out", default="compare.png", help="plot file (PNG)")
    _add_common(p)

    from ar_lm.launch import add_parser as add_launch_parser

    add_launch_parser(sub)

    p = sub.add_parser("generate", help="generate text from a run's latest checkpoint (streamed)")
    p.add_argument("run_dir")
    p.add_argument("--prompt", help="text to continue (starts a new document)")
    p.add_argument("--prompt-ids", help="token ids to continue, e.g. '464, 3290' (for runs without a text tokenizer)")
    p.add_argument("--eos-id", type=int, help="stop at this token id (default: the tokenizer's end of document)")
    p.add_argument("--max-new-tokens", type=int, help="default: 64, or what fits in the context")
    p.add_argument("--temperature", type=float, help="default 1 (the model's distribution); 0 = greedy")
    p.add_argument("--top-k", type=int, help="sample from the K most likely tokens")
    p.add_argument("--top-p", type=float, help="nucleus sampling: the smallest set with mass >= P (0 < P <= 1)")
    p.add_argument("--min-p", type=float, help="keep tokens with p >= M * p_max")
    p.add_argument("--beams", type=int, default=1, help="beam search with B beams; prints the n-best list")
    p.add_argument("--length-penalty", type=float, default=0.6, help="beam search GNMT alpha")
    p.add_argument("--draft", help="draft RUN_DIR (same tokenizer) for speculative decoding")
    p.add_argument("--draft-tokens", type=int, default=4, help="speculative: tokens proposed per target pass")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples (not streamed when > 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON with tokens and log-probs instead of text")
    _add_common(p)

    p = sub.add_parser("import-hf", help="import a Hugging Face GPT-2 / Llama directory as an ar_lm run")
    p.add_argument("hf_dir")
    p.add_argument("run_dir")
    _add_common(p)

    p = sub.add_parser("export-hf", help="export a run as a Hugging Face directory (config.json + safetensors)")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    _add_common(p)

    p = sub.add_parser("config", help="print an experiment's resolved config as JSON")
    p.add_argument("experiment")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    _add_common(p)
    return parser


def cmd_prepare(args) -> int:
    from ar_lm import data

    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction must lie in [0, 1), got {args.val_fraction}")
    max_bytes = int(args.max_mb * 1e6)
    splits, source = None, {"kind": args.source, "files": args.files}
    if args.source == "stdlib":
        docs = data.stdlib_documents(max_bytes)
    elif args.source == "files":
        docs = data.file_documents(args.files, max_bytes)
    else:
        splits, source = data.synthetic_splits(
            args.synthetic_tokens, args.val_fraction or 0.05, args.synthetic_vocab, args.synthetic_order,
            args.synthetic_branching, args.seed,
        )
        docs = splits["train"] + splits["val"]
        if args.tokenizer != "char":
            raise UserError("--source synthetic uses --tokenizer char (one token per symbol)")
    meta = data.write_dataset(
        Path(args.out), docs, args.tokenizer, args.vocab_size, args.val_fraction,
        sp_model_type=args.sp_model_type, source=source, splits=splits,
    )
    splits = {k: {"tokens": v["tokens"], "bytes": v["bytes"], "documents": v["documents"]} for k, v in meta["splits"].items()}
    print(json.dumps({"out": str(Path(args.out).absolute()), "vocab_size": meta["tokenizer"]["vocab_size"], "splits": splits}))
    return 0


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache for the commands that compile (train, eval, generate):
    a repeated run of the same shapes loads its programs instead of compiling them again.

    Directory: $JAX_COMPILATION_CACHE_DIR if set (a sweep gives its runs one of their own), else
    $AR_LM_COMPILE_CACHE, else ~/.cache/ar_lm/jax (under $XDG_CACHE_HOME if set);
    AR_LM_COMPILE_CACHE=off disables it. Programs that compile in under 0.3 s are not stored.
    """
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        path = os.environ["JAX_COMPILATION_CACHE_DIR"]
    else:
        path = os.environ.get("AR_LM_COMPILE_CACHE") or str(
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ar_lm" / "jax")
    if path.lower() == "off":
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)


def _experiment_config(args):
    from ar_lm import config, rundir

    cfg = config.load_experiment(args.experiment, args.set)
    return rundir.with_data_path(cfg, getattr(args, "data", None))


def cmd_train(args) -> int:
    from ar_lm.errors import EXIT_PREEMPTED
    from ar_lm.train import PreemptionGuard, train

    from ar_lm.distributed import configure_cpu_devices, initialize, multi_process_requested

    cfg = _experiment_config(args)
    if not multi_process_requested(args.coordinator):
        configure_cpu_devices(cfg.mesh, cfg.data.batch_size // cfg.optim.grad_accum)
    initialize(args.coordinator, args.num_processes, args.process_id, args.init_timeout)
    run_dir = Path(args.run_dir or Path("runs") / cfg.name)
    with PreemptionGuard() as guard:
        result = train(cfg, run_dir, stop_requested=guard)
    print(json.dumps({"run_dir": str(result.run_dir), **result.summary}))
    if result.summary.get("preempted"):
        print(f"[train] stopped at step {result.summary['step']} with a checkpoint: run the same command to resume",
              file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


def cmd_eval(args) -> int:
    from ar_lm.evaluate import evaluate_run

    print(json.dumps(evaluate_run(args.run_dir, args.data, args.batches)))
    return 0


def cmd_sweep(args) -> int:
    from ar_lm.sweep import run_sweep

    return run_sweep(args.experiment, args.sweep_dir, args.data, args.launcher, args.dry_run, args.only, not args.no_fit)


def cmd_fit(args) -> int:
    from ar_lm import fit
    from ar_lm.io import atomic_write_json
    from ar_lm.plots import plot_fit

    if bool(args.sweep_dir) == bool(args.points):
        raise UserError("give either a SWEEP_DIR or --points CSV")
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    pts = fit.points_from_sweep(args.sweep_dir) if args.sweep_dir else fit.points_from_csv(args.points)
    approaches = tuple(args.approach or (1, 2, 3))
    if 3 in approaches and len(pts.N) < 5 and args.approach:
        raise UserError(f"approach 3 fits 5 parameters and needs at least 5 points, got {len(pts.N)}")
    if 3 in approaches and len(pts.N) < 5:
        approaches = tuple(a for a in approaches if a != 3)
    result = fit.fit_points(pts, n_boot=args.bootstrap, approaches=approaches)
    out = Path(args.out or (Path(args.sweep_dir) / "fit" if args.sweep_dir else Path(args.points).with_suffix("")))
    atomic_write_json(out / "fit.json", result)
    plot_fit(result, out, pts)
    print(fit.format_report(result))
    print(f"[fit] wrote {out / 'fit.json'} and plots", file=sys.stderr)
    return 0


def cmd_compare(args) -> int:
    from ar_lm.compare import compare

    if not args.out.endswith(".png"):
        raise UserError(f"--out must be a .png file, got {args.out}")
    print(compare(args.runs, Path(args.out)))
    return 0


def cmd_launch(args) -> int:
    from ar_lm.launch import run

    return run(args)


def cmd_generate(args) -> int:
    from ar_lm.decode import generate_command

    return generate_command(args)


def cmd_import_hf(args) -> int:
    from ar_lm.hf import import_hf

    result = import_hf(args.hf_dir, args.run_dir)
    print(json.dumps(result))
    print(f"[import-hf] {result['note']}", file=sys.stderr)  # says when the run has no text tokenizer
    return 0


def cmd_export_hf(args) -> int:
    from ar_lm.hf import export_hf

    print(json.dumps(export_hf(args.run_dir, args.out_dir)))
    return 0


def cmd_config(args) -> int:
    from ar_lm.config import to_dict

    print(json.dumps(to_dict(_experiment_config(args)), indent=2))
    return 0


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "eval": cmd_eval, "sweep": cmd_sweep, "fit": cmd_fit,
            "compare": cmd_compare, "launch": cmd_launch, "import-hf": cmd_import_hf,
            "export-hf": cmd_export_hf, "config": cmd_config, "generate": cmd_generate}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    if not debug:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    try:
        rest: list[str] = []
        if argv[:1] == ["launch"] or "launch" in argv[:2]:  # `launch ... -- COMMAND`: COMMAND is not ours to parse
            if "--" in argv:
                cut = argv.index("--")
                argv, rest = argv[:cut], argv[cut + 1 :]
        args = build_parser().parse_args(argv)
        args.cmd_args = rest
        if not args.command:
            raise UserError("no command given: use one of " + ", ".join(COMMANDS) + " (see `ar-lm --help`)")
        if args.command in ("train", "eval", "generate"):
            enable_compilation_cache()
        return COMMANDS[args.command](args)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the non-user failures still get one line without --debug
        from ar_lm.train import NonFiniteError

        if debug:
            raise
        print(f"error: {type(e).__name__}: {e} (rerun with --debug for a traceback)", file=sys.stderr)
        return EXIT_NONFINITE if isinstance(e, NonFiniteError) else 1


if __name__ == "__main__":
    sys.exit(main())
