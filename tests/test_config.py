"""Config: type-checked overrides, close-match suggestions, validation, JSON round trip."""

import dataclasses
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ar_lm import config as C
from ar_lm.errors import UserError


def test_overrides_are_typed():
    cfg = C.apply_overrides(C.ExperimentConfig(), ["model.n_layers=8", "optim.lr=3e-4", "model.qk_norm=true",
                                                   "logging.tags=a,b", "train.tokens=1_000_000"])
    assert cfg.model.n_layers == 8 and isinstance(cfg.model.n_layers, int)
    assert cfg.optim.lr == 3e-4 and cfg.model.qk_norm is True
    assert cfg.logging.tags == ("a", "b") and cfg.train.tokens == 1_000_000


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.n_layrs=8", "did you mean model.n_layers"),
        ("optim.learning_rate=1", "unknown config key 'optim.learning_rate'"),
        ("model.n_layers=two", "model.n_layers expects an integer"),
        ("model.n_layers=2.5", "model.n_layers expects an integer"),
        ("optim.lr=fast", "optim.lr expects a number"),
        ("model.qk_norm=maybe", "model.qk_norm expects true or false"),
        ("model.n_layers", "not of the form"),
    ],
)
def test_bad_overrides_name_the_problem(override, fragment):
    with pytest.raises(UserError, match=fragment):
        C.apply_overrides(C.ExperimentConfig(), [override])


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"model": {"d_model": 30, "n_heads": 4}}, "not divisible by model.n_heads"),
        ({"model": {"n_heads": 4, "n_kv_heads": 3}}, "not divisible by model.n_kv_heads"),
        ({"data": {"seq_len": 512}}, "exceeds model.max_seq_len"),
        ({"model": {"family": "bert"}}, "model.family"),
        ({"optim": {"grad_accum": 3}}, "not divisible by optim.grad_accum"),
    ],
)
def test_validation(changes, fragment):
    cfg = C.ExperimentConfig()
    for section, fields in changes.items():
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **fields)})
    with pytest.raises(UserError, match=fragment):
        C.validate(cfg)


FREE_TEXT = {"name", "data.path", "train.branch_of", "logging.project", "logging.group", "logging.tags", "logging.coords",
             "mesh.rules", "mesh.rule_overrides",  # checked against the rule table (test_cli)
             "data.eval_sets"}  # parsed and opened before a run writes anything (test_eval_splits)


def _with(cfg, key, value):
    section, name = key.split(".")
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})


def test_every_numeric_and_enumerated_field_is_validated():
    cfg = C.ExperimentConfig()
    typed = {k for k in C.all_keys(cfg) if not isinstance(C.field_value(cfg, k), bool)}
    assert typed - FREE_TEXT == set(C.FIELD_RULES) | set(C.CHOICES)
    for key, (_, ok) in C.FIELD_RULES.items():
        default = C.field_value(cfg, key)
        candidates = [(0,), (-1,)] if isinstance(default, tuple) else [-2, -1, 0, 1, 2, 1.5, 0.5]
        if isinstance(default, int) and not isinstance(default, tuple):
            candidates = [c for c in candidates if float(c).is_integer()]
        bad = next(v for v in candidates if not ok(type(default)(v) if not isinstance(default, tuple) else v))
        value = bad if isinstance(default, tuple) else type(default)(bad)
        with pytest.raises(UserError, match=rf"^{re.escape(key)} must be .*, got {re.escape(repr(value))}$"):
            C.validate(_with(cfg, key, value))
    for key in C.CHOICES:
        with pytest.raises(UserError, match=rf"^{re.escape(key)}='bogus' is unknown: use one of "):
            C.validate(_with(cfg, key, "bogus"))


def test_json_round_trip(tmp_path):
    cfg = C.apply_overrides(C.ExperimentConfig(), ["model.family=llama", "logging.tags=x", "mesh.rule_overrides=mlp=tensor"])
    C.save_json(cfg, tmp_path / "c.json")
    assert C.load_json(tmp_path / "c.json") == cfg


def test_experiment_file_loading(tmp_path):
    cfg = C.load_experiment("experiments/tiny.py", ["model.n_layers=3"])
    assert cfg.name == "tiny" and cfg.model.n_layers == 3
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(UserError, match="defines no config"):
        C.load_experiment(bad)
    with pytest.raises(UserError, match="does not exist"):
        C.load_experiment(tmp_path / "missing.py")


_INT_FIELDS = [k for k in C.all_keys(C.ExperimentConfig()) if k in ("model.n_layers", "data.batch_size", "train.steps")]


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(_INT_FIELDS), value=st.integers(min_value=-10**12, max_value=10**12))
def test_property_int_overrides_round_trip(key, value):
    cfg = C.apply_overrides(C.ExperimentConfig(), [f"{key}={value}"])
    section, field = key.split(".")
    assert getattr(getattr(cfg, section), field) == value


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=1, max_size=12).filter(lambda s: "=" not in s))
def test_property_garbage_keys_are_user_errors(text):
    key = f"model.{text}"
    if key in C.all_keys(C.ExperimentConfig()):
        return
    with pytest.raises(UserError):
        C.apply_overrides(C.ExperimentConfig(), [f"{key}=1"])


@settings(max_examples=60, deadline=None)
@given(value=st.floats(allow_nan=False, allow_infinity=False, min_value=1e-12, max_value=1e3))
def test_property_float_overrides(value):
    cfg = C.apply_overrides(C.ExperimentConfig(), [f"optim.lr={value!r}"])
    assert cfg.optim.lr == value
