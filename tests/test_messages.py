"""User-facing messages: a broken experiment file names its file and line, a closed pipe ends quietly, a bad
prompt is refused before anything is printed, every command reading a run directory says what to pass, unknown
config keys find other frameworks' names, every command and argument has help; and text generation past the
context slides its window."""

import argparse
import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ar_lm.cli import COMMANDS, build_parser, main
from ar_lm.config import ExperimentConfig, ModelConfig, apply_overrides
from ar_lm.decoding import decoder as DD
from ar_lm.errors import UserError
from ar_lm.model import transformer as M
from test_decode import make_run, params_of

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "experiments" / "tiny.py")
# context 16: 40 new tokens go well past it
SHORT_CFG = ModelConfig(family="gpt2", vocab_size=257, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, init_std=0.3)


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    from ar_lm.data.tokenizers import ByteTokenizer

    return make_run(tmp_path_factory.mktemp("msg_runs") / "short", SHORT_CFG, ByteTokenizer())


@pytest.mark.parametrize("body, line, kind", [
    ("from ar_lm.config import ExperimentConfig, ModelConfig\n\n\ndef config():\n"
     "    return ExperimentConfig(model=ModelConfig(n_layer=3))\n", 5, "TypeError"),
    ("import os\nx = undefined_name\n\ndef config():\n    pass\n", 2, "NameError"),
    ("def config(:\n    pass\n", 1, "SyntaxError"),
])
def test_broken_experiment_file_names_file_and_line(tmp_path, capsys, body, line, kind):
    path = tmp_path / "x.py"
    path.write_text(body)
    assert main(["config", str(path)]) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"error: {path}:{line}: {kind}: ") and err.endswith(": fix the experiment file"), err



def test_broken_sweep_function_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "s.py"
    path.write_text("from ar_lm.config import ExperimentConfig\nfrom ar_lm.scaling import Sweep\n\n\n"
                    "def config():\n    return ExperimentConfig()\n\n\ndef sweep():\n    return Sweep(point=[])\n")
    assert main(["sweep", str(path), "--sweep-dir", str(tmp_path / "out")]) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"error: {path}:10: TypeError: ") and err.endswith(": fix the experiment file"), err
    assert not (tmp_path / "out").exists()

def test_closed_pipe_exits_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "ar_lm", "config", TINY], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO)
    proc.stdout.close()  # the reader is gone before the command writes (as `| head -1` once it has its line)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_closed_pipe_in_process(monkeypatch, capsys):
    from ar_lm import cli

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "dispatch", broken)
    assert main(["config", TINY]) == 141
    assert capsys.readouterr().err == ""


def test_too_long_prompt_is_refused_before_it_is_printed(short_run, capsys):
    assert main(["generate", str(short_run), "--prompt", "x" * 20]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "model's context is 16" in captured.err
    assert main(["generate", str(short_run), "--prompt", "hi", "--max-new-tokens", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "max-new-tokens must be a positive" in captured.err


@pytest.mark.parametrize("extra", [["eval"], ["generate", "--prompt", "hi"], ["lm-eval", "--tasks", "x"],
                                   ["compress", "IN", "OUT"], ["decompress", "IN", "OUT"], ["export-hf", "OUT"]])
@pytest.mark.parametrize("exists", [False, True])
def test_every_command_reading_a_run_dir_says_what_to_pass(tmp_path, capsys, extra, exists):
    run = tmp_path / "nonexistent"
    if exists:
        run.mkdir()  # a directory, but no config.json
    command, *rest = extra
    rest = [str(tmp_path / a) if a in ("IN", "OUT") else a for a in rest]
    assert main([command, str(run), *rest]) == 2
    err = one_error_line(capsys)
    what = "is not an ar_lm run directory (no config.json)" if exists else "does not exist"
    assert err == f"error: {run} {what}: pass a directory written by `ar-lm train` (or `ar-lm import-hf`)", err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["nonexistent"] if exists else [])


def test_generate_draft_must_be_a_run_dir(short_run, tmp_path, capsys):
    assert main(["generate", str(short_run), "--prompt", "hi", "--draft", str(tmp_path / "nope")]) == 2
    assert "nope does not exist: pass a directory written by `ar-lm train`" in one_error_line(capsys)


@pytest.mark.parametrize("key, suggestion", [
    ("optim.learning_rate", "optim.lr"), ("model.num_layers", "model.n_layers"), ("model.n_layer", "model.n_layers"),
    ("model.hidden_size", "model.d_model"), ("model.n_embd", "model.d_model"), ("data.block_size", "data.seq_len"),
    ("model.num_attention_heads", "model.n_heads"), ("optim.max_grad_norm", "optim.clip_norm"),
    ("model.seed", "train.seed"), ("model.n_layrs", "model.n_layers"),
])
def test_unknown_key_suggests_our_name(key, suggestion):
    with pytest.raises(UserError, match="did you mean") as info:
        apply_overrides(ExperimentConfig(), [f"{key}=1"])
    assert str(info.value).split("did you mean ")[1].split(",")[0].rstrip("?") == suggestion


def test_unknown_key_without_a_match_points_at_the_reference(capsys):
    assert main(["config", TINY, "--set", "zzz.qqqq=1"]) == 2
    assert one_error_line(capsys).endswith("see docs/reference/config.md")
    assert main(["config", TINY, "--set", "optim.learning_rate=1e-3"]) == 2
    assert "did you mean optim.lr?" in one_error_line(capsys)


def test_every_command_and_argument_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    assert set(helps) == set(COMMANDS) and all(helps.values())
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, p in sub.choices.items()
               for a in p._actions if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, missing
    assert "synthetic" not in COMMANDS  # a `prepare --source`, not a command


# ---------------------------------------------------------------------------------------------
# text past the context


@functools.partial(jax.jit, static_argnums=0)
def full_logits(cfg, params, tokens_BxL):
    return M.apply(cfg, params, tokens_BxL)


def windowed_greedy(cfg, params, prompt, n, window, eos_id=None):
    """Greedy step by step, each step a plain forward pass over the last `window` tokens only."""
    seq = list(prompt)
    for _ in range(n):
        ctx = seq[-window:]
        buf = np.zeros((1, cfg.max_seq_len), np.int32)  # one shape (padding after the window: causal)
        buf[0, : len(ctx)] = ctx
        seq.append(int(np.argmax(np.asarray(full_logits(cfg, params, buf))[0, len(ctx) - 1])))
        if seq[-1] == eos_id:
            break
    return seq[len(prompt):]


def test_sliding_generation_conditions_on_the_last_window():
    cfg, params, prompt = SHORT_CFG, params_of(SHORT_CFG), [256, 104, 105]
    ref = windowed_greedy(cfg, params, prompt, 40, cfg.max_seq_len - 1)
    res = DD.generate_sliding(cfg, params, [prompt], 40, keep=cfg.max_seq_len - 1)
    assert res.tokens[0].tolist() == ref
    chunks = [g.tokens[0].tolist() for g in DD.sliding_chunks(cfg, params, [prompt], 40, keep=cfg.max_seq_len - 1)]
    assert sum(chunks, []) == ref and len(chunks) == 1 + 40 - (16 - 3)  # then one token per chunk
    eos = ref[20]  # stop at a token that first appears at index 20
    first = ref.index(eos)
    res = DD.generate_sliding(cfg, params, [prompt], 40, keep=cfg.max_seq_len - 1, eos_id=eos)
    assert int(res.lengths[0]) == first + 1 and res.tokens[0, : first + 1].tolist() == ref[: first + 1]
    assert set(res.tokens[0, first + 1:].tolist()) <= {eos} and not res.logprobs[0, first + 1:].any()


def test_cli_generate_past_the_context(short_run, capsys):
    cfg, params = SHORT_CFG, params_of(SHORT_CFG)
    prompt = [256] + list(b"hi")
    ref = windowed_greedy(cfg, params, prompt, 40, cfg.max_seq_len - 1, eos_id=256)
    assert main(["generate", str(short_run), "--prompt", "hi", "--max-new-tokens", "40", "--temperature", "0",
                 "--json"]) == 0
    sample = json.loads(capsys.readouterr().out)["samples"][0]
    assert sample["tokens"] == ref
    assert main(["generate", str(short_run), "--prompt", "hi", "--max-new-tokens", "40", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "hi" + sample["text"] + "\n"
    assert main(["generate", str(short_run), "--prompt", "hi", "--max-new-tokens", "40", "--beams", "2"]) == 2
    assert "ask for at most 13 new tokens" in one_error_line(capsys)
