"""The README's benchmark setup end to end, on the TinyStories sample in ../shared/data: the file's lines split
90/5/5 into train.txt / valid.txt / test.txt (in order, as Tiny Shakespeare's 90/10 split), prepared with
explicit splits; a second validation set (standard-library code) made with the same tokenizer; experiments/
tiny.py trained with both validation sets; test perplexity at stride seq_len and seq_len / 2; a local
multiple-choice lm-eval task. Writes benchmarks/results/standard_setup_<date>_cpu<cores>.json.

    python benchmarks/standard_setup.py [--steps 300]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

from machine import StealMeter, ar_lm_cli, write_result

ROOT = Path(__file__).resolve().parent.parent
STORIES = ROOT.parent / "shared" / "data" / "tinystories" / "tiny_stories.txt"
TASK = """task: story_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def _split_files(tmp: Path) -> dict[str, Path]:
    lines = STORIES.read_text(encoding="utf-8").splitlines(keepends=True)
    n = len(lines)
    cuts = {"train": (0, int(0.9 * n)), "valid": (int(0.9 * n), int(0.95 * n)), "test": (int(0.95 * n), n)}
    paths = {}
    for name, (a, b) in cuts.items():
        paths[name] = tmp / "stories" / f"{name}.txt"
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        paths[name].write_text("".join(lines[a:b]), encoding="utf-8")
    return paths


def _task(tmp: Path) -> Path:
    """Which word ends a story sentence: the sample's own phrases against shuffled ones (20 questions)."""
    stems = [("Once upon a time, there was a little", ["girl", "car", "sky"]),
             ("She was very", ["happy", "table", "run"]), ("They played in the", ["park", "eat", "blue"]),
             ("Lily wanted to share the needle with her", ["mom", "sew", "green"]),
             ("The sun was", ["shining", "chair", "jumped"]), ("He said, \"Thank you", ["mom", "tree", "ran"]),
             ("One day, a little boy named", ["Tim", "happy", "under"]), ("They were best", ["friends", "eat", "red"]),
             ("The dog wagged its", ["tail", "house", "sang"]), ("She went to the", ["park", "happy", "slowly"])]
    folder = tmp / "tasks"
    folder.mkdir()
    rows = [{"question": q, "choices": [" " + c for c in choices], "answer": 0} for q, choices in stems]
    (folder / "story_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "story_mc.yaml").write_text(TASK.format(jsonl=folder / "story_mc.jsonl"))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    if not STORIES.is_file():
        sys.exit(f"error: {STORIES} is missing: this benchmark reads the shared TinyStories sample")
    steal = StealMeter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files, data, code, run = _split_files(tmp), tmp / "data", tmp / "code", tmp / "run"
        prepared = json.loads(ar_lm_cli("prepare", "--source", "files", "--files", str(files["train"]),
                                     "--val-files", str(files["valid"]), "--test-files", str(files["test"]),
                                     "--tokenizer", "byte", "--out", str(data)))
        ar_lm_cli("prepare", "--source", "stdlib", "--max-mb", "2", "--tokenizer-from", str(data), "--out", str(code))
        ar_lm_cli("train", str(ROOT / "experiments" / "tiny.py"), "--data", str(data), "--run-dir", str(run),
               "--set", f"train.steps={args.steps}", "--set", "logging.wandb=false",
               "--set", f"data.eval_sets=code={code}")
        summary = json.loads((run / "summary.json").read_text())
        test = {s: json.loads(ar_lm_cli("eval", str(run), "--split", "test", "--stride", str(s), "--json"))
                for s in (128, 64)}
        lm_eval = json.loads(ar_lm_cli("lm-eval", str(run), "--tasks", "story_mc", "--include-path", str(_task(tmp)),
                                    "--json"))
    result = {
        "date": datetime.date.today().isoformat(), "cores": os.cpu_count(), "steal_frac": steal.frac(),
        "command": f"python benchmarks/standard_setup.py --steps {args.steps}",
        "splits": prepared["splits"],
        "in_training": {"val_loss": summary["val_loss"], "val_sets": summary.get("val_sets")},
        "test": {f"stride_{s}": {k: r.get(k) for k in ("loss", "perplexity", "bits_per_byte", "bits_per_char",
                                                       "word_perplexity", "stderr", "eval_tokens")}
                 for s, r in test.items()},
        "lm_eval": lm_eval.get("metrics", lm_eval),
    }
    write_result("standard_setup", result)


if __name__ == "__main__":
    main()
