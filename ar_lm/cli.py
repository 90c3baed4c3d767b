"""`ar-lm` command line. Every user mistake is one line on stderr and exit status 2;
`--debug` shows tracebacks."""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--source", choices=("stdlib", "files"), required=True)
    p.add_argument("--files", nargs="*", default=[], help="files, globs or directories (.txt/.jsonl/.parquet)")
    p.add_argument("--tokenizer", choices=("sentencepiece", "byte", "char"), default="byte")
    p.add_argument("--vocab-size", type=int, default=0, help="sentencepiece (required) or char (cap)")
    p.add_argument("--sp-model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--max-mb", type=float, default=8.0, help="stop reading the source after this many MB (0: all)")
    p.add_argument("--out", required=True, help="dataset directory to create (must not exist or be empty)")
    _add_common(p)

    p = sub.add_parser("train", help="train (or resume) an experiment")
    p.add_argument("experiment", help="experiment file, e.g. experiments/tiny.py")
    p.add_argument("--data", help="dataset directory (overrides data.path)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--run-dir", help="run directory (default: runs/<experiment name>)")
    _add_common(p)

    p = sub.add_parser("eval", help="evaluate a run's latest checkpoint; prints JSON")
    p.add_argument("run_dir")
    p.add_argument("--data", help="dataset directory (default: the run's own)")
    p.add_argument("--batches", type=int, help="number of val batches (default: train.eval_batches; -1: all)")
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
    if args.source == "stdlib":
        docs = data.stdlib_documents(max_bytes)
    else:
        docs = data.file_documents(args.files, max_bytes)
    meta = data.write_dataset(
        Path(args.out), docs, args.tokenizer, args.vocab_size, args.val_fraction,
        sp_model_type=args.sp_model_type, source={"kind": args.source, "files": args.files},
    )
    splits = {k: {"tokens": v["tokens"], "bytes": v["bytes"], "documents": v["documents"]} for k, v in meta["splits"].items()}
    print(json.dumps({"out": str(Path(args.out).absolute()), "vocab_size": meta["tokenizer"]["vocab_size"], "splits": splits}))
    return 0


def _experiment_config(args):
    from ar_lm import config, rundir

    cfg = config.load_experiment(args.experiment, args.set)
    return rundir.with_data_path(cfg, getattr(args, "data", None))


def cmd_train(args) -> int:
    from ar_lm.train import train

    cfg = _experiment_config(args)
    run_dir = Path(args.run_dir or Path("runs") / cfg.name)
    result = train(cfg, run_dir)
    print(json.dumps({"run_dir": str(result.run_dir), **result.summary}))
    return 0


def cmd_eval(args) -> int:
    from ar_lm.evaluate import evaluate_run

    print(json.dumps(evaluate_run(args.run_dir, args.data, args.batches)))
    return 0


def cmd_config(args) -> int:
    from ar_lm.config import to_dict

    print(json.dumps(to_dict(_experiment_config(args)), indent=2))
    return 0


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "eval": cmd_eval, "config": cmd_config}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    if not debug:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    try:
        args = build_parser().parse_args(argv)
        if not args.command:
            raise UserError("no command given: use one of " + ", ".join(COMMANDS) + " (see `ar-lm --help`)")
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
