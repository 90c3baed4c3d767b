"""lm-evaluation-harness adapter on local tasks (a multiple-choice JSONL and a task YAML written here, no
network): loglikelihood against teacher forcing, accuracy against a direct argmax, rolling windows,
generation against ar_lm's greedy decoder, `ar-lm lm-eval`, and the sweep's summary columns."""

import csv
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm_eval import evaluator
from lm_eval.api.instance import Instance

from ar_lm.cli import main
from ar_lm.config import ExperimentConfig, MeshConfig, ModelConfig
from ar_lm.data.tokenizers import ByteTokenizer
from ar_lm.decoding import generate
from ar_lm.decoding.harness import RunLM, cut_at
from ar_lm.decoding.harness_command import task_manager
from ar_lm.io import atomic_write_json, sha256_file
from ar_lm.model import transformer as M
from ar_lm.scaling import downstream
from ar_lm.scaling.runner import SweepRunner
from ar_lm.scaling.sweeps import Sweep, SweepPoint
from ar_lm.training import rundir
from ar_lm.training.checkpoint import Checkpointer

# init_std 0.3: logits with clear margins, so greedy / argmax comparisons are not decided by rounding
CFG = ModelConfig(family="gpt2", vocab_size=257, d_model=32, n_layers=2, n_heads=4, max_seq_len=48, init_std=0.3)
QUESTIONS = [  # (question, choices, answer); the last one is longer than the model's context of 48 bytes
    ("the cat sat on the", ["mat", "dog", "sun"], 0),
    ("the dog ran to a", ["big red house", "then"], 0),
    ("a red house and", ["then slept", "the", "cat", "ran"], 1),
    ("", ["red", "house"], 1),
    ("slept in the", ["sun.", "mat."], 0),
    ("the big", ["dog", "cat", "house"], 2),
    ("on a mat the cat", ["sat", "slept"], 1),
    ("the cat and the dog ran to the big red house and then they slept in the sun", ["again", "no"], 0),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A byte-tokenizer run directory as `ar-lm train` leaves it (config, tokenizer, one checkpoint)."""
    path = tmp_path_factory.mktemp("lm_eval") / "run"
    path.mkdir()
    rundir.write_config(path, ExperimentConfig(model=CFG, mesh=MeshConfig(devices=1)))
    ckpt = Checkpointer(path / rundir.CHECKPOINTS, async_save=False)
    ckpt.save(3, {"params": M.init_params_jit(CFG, jax.random.key(0))}, {})
    ckpt.close()
    tok = ByteTokenizer()
    (path / rundir.TOKENIZER).mkdir()
    tok_file = tok.save(path / rundir.TOKENIZER)
    atomic_write_json(path / rundir.TOKENIZER / "metadata.json", {"tokenizer": {
        "kind": "byte", "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "file": tok_file.name,
        "sha256": sha256_file(tok_file)}})
    return path


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A folder with tiny_mc.jsonl and tiny_mc.yaml (lm-eval's local json builder, its cache in here too)."""
    path = tmp_path_factory.mktemp("tasks")
    with open(path / "tiny_mc.jsonl", "w") as f:
        for q, choices, answer in QUESTIONS:
            f.write(json.dumps({"question": q, "choices": choices, "answer": answer}) + "\n")
    (path / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path / "tiny_mc.jsonl"}
  cache_dir: {path / "hf_cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return path


@pytest.fixture(scope="module")
def params(run):
    return jax.device_get(M.init_params_jit(CFG, jax.random.key(0)))


@pytest.fixture(scope="module")
def lm(run):
    return RunLM(run, batch_size=4)  # requests in several batches (the last one filled up) and length buckets


_log_softmax = jax.jit(lambda params, x: jax.nn.log_softmax(M.apply(CFG, params, x), axis=-1))


def teacher_forced(params, pairs: list[tuple[list[int], list[int]]]) -> np.ndarray:
    """sum log p(cont | context) of each (context, cont) pair, each over its last max_seq_len + 1 tokens;
    one forward pass over all pairs, each a row of max_seq_len inputs (whatever follows a row's tokens is
    later in a causal model, so it changes nothing)."""
    assert len(pairs) <= 32
    rows = [(ctx + cont)[-(CFG.max_seq_len + 1):] for ctx, cont in pairs]
    tokens = np.zeros((32, CFG.max_seq_len + 1), np.int32)
    for r, ids in enumerate(rows):
        tokens[r, :len(ids)] = ids
    logp = np.asarray(_log_softmax(params, jnp.asarray(tokens[:, :-1])), np.float64)
    return np.array([sum(logp[r, i - 1, ids[i]] for i in range(len(ids) - len(cont), len(ids)))
                     for r, (ids, (_, cont)) in enumerate(zip(rows, pairs))])


def test_loglikelihood_and_accuracy_match_direct_computation(lm, tasks, params):
    res = evaluator.simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=task_manager(["tiny_mc"], str(tasks)),
                                    log_samples=True)
    samples = sorted(res["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(QUESTIONS)
    eos, correct = ByteTokenizer().eos_id, []
    # the context starts a document (after EOS); lm-eval's target delimiter is a space
    want = iter(teacher_forced(params, [([eos] + list(q.encode()), list((" " + c).encode()))
                                        for q, choices, _ in QUESTIONS for c in choices]))
    for (q, choices, answer), sample in zip(QUESTIONS, samples):
        got, expected = [float(r[0][0]) for r in sample["resps"]], [next(want) for _ in choices]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
        correct.append(int(np.argmax(expected)) == answer)
    assert res["results"]["tiny_mc"]["acc,none"] == pytest.approx(np.mean(correct), abs=1e-12)
    assert 0 < np.mean(correct) < 1  # a random model: the check is not all-or-nothing
    assert lm.step == 3


def test_loglikelihood_rolling_and_generate_until(lm, params):
    eos, L = ByteTokenizer().eos_id, CFG.max_seq_len
    texts = ["the cat sat on the mat.", "a big red house and then the dog slept in the sun. " * 3]
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)])
    short, long = list(texts[0].encode()), list(texts[1].encode())
    # the short text is one window: its whole log-prob; the long one (156 bytes) predicts 48, 48, 48 and 12
    # tokens, each window with a full context before it
    windows = [([eos], long[:L])] + [(long[min(s + L, len(long)) - L - 1:s], long[s:s + L])
                                      for s in range(L, len(long), L)]
    want = teacher_forced(params, [([eos], short)] + windows)
    assert got[0] == pytest.approx(want[0], abs=1e-4) and got[1] == pytest.approx(want[1:].sum(), abs=1e-4)

    contexts = ["the cat sat", "a big red house and then", "dog"]
    res = generate(CFG, params, [[eos] + list(c.encode()) for c in contexts], 12, eos_id=eos)
    raw = [bytes(t for t in res.tokens[b, :res.lengths[b]] if t < 256).decode(errors="replace") for b in range(3)]
    stops = [[raw[0][4]], ["\x00never"], [raw[2][2], raw[2][1]]]  # stop strings the greedy text holds (or not)
    reqs = [Instance("generate_until", {}, (c, {"until": s, "max_gen_toks": 12}), i)
            for i, (c, s) in enumerate(zip(contexts, stops))]
    out = lm.generate_until(reqs)
    assert out == [cut_at(r, s) for r, s in zip(raw, stops)]
    assert len(out[0]) <= 4 < len(raw[0]) and out[1] == raw[1] and len(out[2]) <= 2


def test_cli_writes_results_and_sweep_columns(run, tasks, capsys):
    code = main(["lm-eval", str(run), "--tasks", "tiny_mc", "--include-path", str(tasks), "--limit", "5",
                 "--batch-size", "8"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    results = json.loads((run / rundir.LM_EVAL_RESULTS).read_text())
    acc = results["metrics"]["tiny_mc/acc"]
    assert lines[0].startswith(f"tiny_mc/acc {acc:.4f} ± ") and len(lines) == 1
    assert results["step"] == 3 and results["request"]["limit"] == 5
    assert results["n-samples"]["tiny_mc"]["effective"] == 5
    assert acc * 5 == pytest.approx(round(acc * 5)) and math.isfinite(results["metrics"]["tiny_mc/acc_stderr"])

    spec = downstream.LmEvalSpec.create("tiny_mc", str(tasks), limit=5, batch_size=8)
    assert results["request"] == spec.request()
    assert downstream.columns(run) == {}  # no summary.json: not the run's final step
    rundir.write_summary(run, {"step": 3, "finished": True})
    assert downstream.columns(run) == {"lm_eval/tiny_mc/acc": acc, "lm_eval/tiny_mc/acc_stderr":
                                       results["metrics"]["tiny_mc/acc_stderr"]}
    assert downstream.run_points(spec, {"p": run}, run / "logs", {}) == {"p": "cached"}  # evaluated once
    rundir.write_summary(run, {"step": 4, "finished": True})
    assert downstream.columns(run) == {}  # a later step: stale
    (run / rundir.SUMMARY).unlink()


def test_sweep_runs_tasks_once_and_adds_summary_columns(run, tasks, tmp_path):
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(run, sweep_dir / "runs" / "p0", ignore=shutil.ignore_patterns("lm_eval"))
    rundir.write_summary(sweep_dir / "runs" / "p0", {"step": 3, "finished": True})
    cfg = ExperimentConfig(model=CFG, mesh=MeshConfig(devices=1))
    points = tuple(SweepPoint(f"p{i}", cfg, {"N": 10 + i, "D": 100, "C": 1e3}) for i in range(2))
    runner = SweepRunner(Sweep("s", cfg, points), sweep_dir, tmp_path / "data")
    spec = downstream.LmEvalSpec.create("tiny_mc", str(tasks), limit=4, batch_size=8)
    logs = sweep_dir / "logs"
    assert downstream.run_points(spec, {"p0": runner.run_dir("p0")}, logs, runner.cache_env()) == {"p0": "done"}
    results = json.loads((runner.run_dir("p0") / rundir.LM_EVAL_RESULTS).read_text())
    assert results["request"] == spec.request() and results["n-samples"]["tiny_mc"]["effective"] == 4
    assert downstream.run_points(spec, {"p0": runner.run_dir("p0")}, logs, runner.cache_env()) == {"p0": "cached"}
    runner.write_summary(points)
    with open(sweep_dir / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["lm_eval/tiny_mc/acc"]) == results["metrics"]["tiny_mc/acc"]
    assert rows[1]["lm_eval/tiny_mc/acc"] == ""  # p1 has no results (it never ran)
    bad = downstream.LmEvalSpec.create("tiny_mc", str(tasks), limit=4, num_fewshot=-1)
    assert downstream.run_points(bad, {"p0": runner.run_dir("p0")}, logs, {}) == {
        "p0": "error: --num-fewshot must be >= 0, got -1"}


def test_bad_input_is_one_line(run, tasks, capsys):
    assert main(["lm-eval", str(run), "--tasks", "tiny_mcq", "--include-path", str(tasks)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown lm-eval task 'tiny_mcq'") and "tiny_mc" in err[0]
    assert main(["lm-eval", str(run), "--tasks", "tiny_mc", "--limit", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--limit must be > 0" in err[0]
