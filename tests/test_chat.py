"""Chat templates (rendering as transformers does), chat datasets with a loss mask, masked training and eval."""

import dataclasses
import io
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from ar_lm.cli import main
from ar_lm.data.chat import CHATML, NAMED, ChatTemplate, load_template, render, render_text
from ar_lm.data.dataset import NO_LOSS_BIT, TokenDataset
from ar_lm.data.pipeline import eval_batches
from ar_lm.decoding.chat import ChatSession, chat_loop, chat_turn_text
from ar_lm.decoding.decoder import generate
from ar_lm.decoding.sampling import GREEDY
from ar_lm.model.transformer import apply, init_params
from ar_lm.training.step import _grads, loss_fn, loss_shares, micro_batches, split_loss_mask

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": " Hello! "},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4, of course."},
]
LLAMA3_STYLE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def _hf_tokenizer(template: str, specials: list[str], bos: str, eos: str):
    """A PreTrainedTokenizerFast over a tiny in-memory word-level model, with `template` as its chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]", bos_token=bos or None, eos_token=eos)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = template
    return tok


@pytest.mark.torch  # transformers is the reference
@pytest.mark.parametrize("template, specials, bos, eos", [
    (CHATML, ["<|im_start|>", "<|im_end|>"], "", "<|im_end|>"),
    (LLAMA3_STYLE, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>"),
], ids=["chatml", "llama3_style"])
def test_rendering_equals_transformers_apply_chat_template(tmp_path, template, specials, bos, eos):
    tok = _hf_tokenizer(template, specials, bos, eos)
    tok.save_pretrained(tmp_path)
    loaded = load_template(str(tmp_path / "tokenizer_config.json"))
    assert loaded.source == template and loaded.bos_token == bos and loaded.eos_token == eos
    assert set(specials) <= set(loaded.specials)
    for gen in (False, True):
        expected = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=gen)
        assert render_text(loaded, CONVERSATION, gen) == expected
        assert render(loaded, CONVERSATION, gen).text == expected
        direct = ChatTemplate("t", template, bos, eos)
        assert render_text(direct, CONVERSATION, gen) == expected


def test_named_templates_render_the_published_structure_and_spans():
    r = render(NAMED["chatml"], CONVERSATION)
    assert r.text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n")
    assert [r.text[a:b] for a, b in r.spans] == [" Hello! <|im_end|>", "4, of course.<|im_end|>"]
    r = render(NAMED["llama3"], CONVERSATION, add_generation_prompt=True)
    assert r.text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>")
    assert r.text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert [r.text[a:b] for a, b in r.spans] == ["Hello!<|eot_id|>", "4, of course.<|eot_id|>"]  # content | trim
    r = render(NAMED["gemma"], CONVERSATION[1:])
    assert "<start_of_turn>model\nHello!<end_of_turn>\n" in r.text and r.text.startswith("<bos><start_of_turn>user\n")
    assert [r.text[a:b] for a, b in r.spans] == ["Hello!<end_of_turn>", "4, of course.<end_of_turn>"]


def _write_conversations(path, n=12):
    rows = []
    for i in range(n):
        rows.append({"messages": [{"role": "user", "content": f"count to {i % 5 + 1}"},
                                  {"role": "assistant", "content": " ".join(str(k) for k in range(1, i % 5 + 2))},
                                  {"role": "user", "content": "thanks"},
                                  {"role": "assistant", "content": "you are welcome"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    rows = _write_conversations(root / "conv.jsonl", 24)
    out = root / "data"
    assert main(["prepare", "--source", "chat", "--files", str(root / "conv.jsonl"), "--chat-template", "chatml",
                 "--tokenizer", "char", "--val-fraction", "0.25", "--out", str(out)]) == 0
    return out, rows


def test_prepare_chat_mask_covers_exactly_the_assistant_spans(chat_data):
    out, rows = chat_data
    ds = TokenDataset(out)
    tok, template = ds.tokenizer, NAMED["chatml"]
    assert ds.has_loss_mask and all(tok.encode(s) == [tok.vocab_size - 2 + i] for i, s in enumerate(template.specials))
    texts = {r.text: r for r in (render(template, row["messages"]) for row in rows)}
    seen = 0
    for split in ("train", "val"):
        tokens, mask = np.concatenate(ds.shards(split)), np.concatenate(ds.mask_shards(split))
        assert tokens.shape == mask.shape and set(np.unique(mask)) <= {0, 1}
        ends = np.flatnonzero(tokens == ds.eos_id)
        assert np.all(mask[ends] == 0)
        for start, stop in zip(np.r_[0, ends[:-1] + 1], ends):
            doc_ids, doc_mask = tokens[start:stop], mask[start:stop]
            r = texts[tok.decode(doc_ids)]  # the document is one rendered conversation, exactly
            expected = "".join(r.text[a:b] for a, b in r.spans)
            assert tok.decode(doc_ids[doc_mask == 1]) == expected
            assert expected.count("<|im_end|>") == 2 and "assistant" not in expected
            on = np.flatnonzero(doc_mask)  # every run of loss-carrying tokens is exactly one span, in order
            runs = np.split(on, np.flatnonzero(np.diff(on) > 1) + 1)
            assert [tok.decode(doc_ids[run]) for run in runs] == [r.text[a:b] for a, b in r.spans]
            seen += 1
    assert seen == len(rows)


def test_altered_mask_shard_fails_its_checksum(chat_data, tmp_path, capsys):
    import shutil

    out, _ = chat_data
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / ".verified.json").unlink(missing_ok=True)
    mask = copy / "train_00000.mask.bin"
    raw = bytearray(mask.read_bytes())
    raw[0] ^= 1
    mask.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="fails its checksum"):
        TokenDataset(copy)


def _masked_batch(chat_data, seq_len=32, batch=8):
    out, _ = chat_data
    ds = TokenDataset(out)
    return ds, eval_batches(ds, seq_len, batch, 0, 0, "train")[0]


def test_masked_loss_is_the_mean_over_unmasked_targets_by_hand(chat_data):
    ds, packed = _masked_batch(chat_data)
    cfg = tiny_config(ds.path, model={"vocab_size": ds.vocab_size, "n_layers": 1})
    params = init_params(cfg.model, jax.random.PRNGKey(0))
    tokens = np.asarray(packed) & (NO_LOSS_BIT - 1)
    weight = ((np.asarray(packed)[:, 1:] & NO_LOSS_BIT) == 0).astype(np.float64)
    assert 0 < weight.sum() < weight.size  # some targets masked, some not
    logits = np.asarray(jax.jit(lambda p, x: apply(cfg.model, p, x))(params, jnp.asarray(tokens[:, :-1])), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    by_hand = (nll * weight).sum() / weight.sum()
    _, ce = jax.jit(lambda p, b: loss_fn(p, b, cfg))(params, jnp.asarray(packed))
    assert float(ce) == pytest.approx(by_hand, rel=1e-5)
    assert abs(float(ce) - nll.mean()) > 1e-3  # the mask changes the loss
    # accumulated over micro-batches: the same mean over the whole batch's unmasked targets
    cfg2 = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, grad_accum=2))
    ce1, g1, _ = jax.jit(lambda p, b: _grads(cfg, p, b, None))(params, jnp.asarray(packed))
    ce2, g2, _ = jax.jit(lambda p, b: _grads(cfg2, p, b, None))(params, jnp.asarray(packed))
    assert float(ce2) == pytest.approx(float(ce1), rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)


def test_without_a_mask_the_loss_and_gradients_are_exactly_the_plain_mean(byte_data):
    ds = TokenDataset(byte_data)
    assert not ds.has_loss_mask and ds.mask_shards("train") is None
    batch = jnp.asarray(eval_batches(ds, 32, 8, 0, 0, "train")[0])
    tokens, weight = split_loss_mask(batch)
    np.testing.assert_array_equal(tokens, batch)
    assert bool(jnp.all(weight == 1))
    np.testing.assert_array_equal(loss_shares(micro_batches(batch, 4)), np.ones(4, np.float32))  # accum: weights 1
    cfg = tiny_config(byte_data, model={"vocab_size": ds.vocab_size, "n_layers": 1})
    params = init_params(cfg.model, jax.random.PRNGKey(1))

    def plain(p):  # the loss before loss masks existed
        logits = apply(cfg.model, p, batch[:, :-1])
        lse = jax.nn.logsumexp(logits, axis=-1)
        return jnp.mean(lse - jnp.take_along_axis(logits, batch[:, 1:, None], axis=-1)[..., 0])

    ce_plain, g_plain = jax.jit(jax.value_and_grad(plain))(params)
    (_, ce), g = jax.jit(lambda p: jax.value_and_grad(loss_fn, has_aux=True)(p, batch, cfg))(params)
    assert float(ce) == float(ce_plain)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), g, g_plain)


def test_training_and_eval_on_chat_data_score_only_unmasked_targets(chat_data, tmp_path, capsys, monkeypatch):
    out, _ = chat_data
    ds = TokenDataset(out)
    run = tmp_path / "run"
    cfg = tiny_config(out, train={"steps": 4}, model={"max_seq_len": 128})
    from ar_lm.training.loop import train

    result = train(cfg, run)
    assert np.isfinite(result.summary["val_loss"])
    assert main(["eval", str(run), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tokens, mask = np.concatenate(ds.shards("val")), np.concatenate(ds.mask_shards("val"))
    assert r["eval_tokens"] == int(mask[1:].sum())  # every target but the first, once; masked ones not at all
    n_bytes = ds.token_bytes()[tokens[1:]][mask[1:] == 1].sum()
    nll = r["loss"] * r["eval_tokens"]
    assert r["bits_per_byte"] == pytest.approx(nll / (np.log(2) * n_bytes), rel=1e-6)
    # the terminal conversation: one printed reply per user line, the template taken from the run
    monkeypatch.setattr("sys.stdin", io.StringIO("count to 3\n\nthanks\n"))
    assert main(["generate", str(run), "--chat", "--temperature", "0", "--max-new-tokens", "6"]) == 0
    replies = capsys.readouterr().out.splitlines()
    assert len(replies) == 2


def test_chat_turn_two_with_cache_reuse_equals_reprefilling_the_whole_conversation(chat_data):
    out, rows = chat_data
    ds = TokenDataset(out)
    tok, template = ds.tokenizer, NAMED["chatml"]
    cfg = tiny_config(out, model={"vocab_size": ds.vocab_size, "n_layers": 1, "max_seq_len": 128}).model
    params = init_params(cfg, jax.random.PRNGKey(3))
    eot = tok.encode(template.end_of_turn)[0]
    session = ChatSession(cfg, params, eot, GREEDY)
    messages = [{"role": "user", "content": "count to 2"}]
    text1 = chat_turn_text(template, messages, "")
    ids1 = [ds.eos_id] + tok.encode(text1)
    reply1 = session.turn(ids1, 5)
    first = generate(cfg, params, [ids1], 5, GREEDY, eos_id=eot)
    assert reply1 == first.tokens[0, : first.lengths[0]].tolist()
    messages += [{"role": "assistant", "content": tok.decode(reply1)}, {"role": "user", "content": "thanks"}]
    text2 = chat_turn_text(template, messages, text1 + tok.decode(reply1))
    assert eot not in reply1  # cut at 5 tokens: the new turn's text closes the reply first
    assert text2 == "<|im_end|>\n<|im_start|>user\nthanks<|im_end|>\n<|im_start|>assistant\n"
    ids2 = tok.encode(text2)
    fed = len(session.history)
    reply2 = session.turn(ids2, 7)
    assert session.history[:fed] == ids1 + reply1 and session.history[fed:] == ids2 + reply2
    whole = generate(cfg, params, [ids1 + reply1 + ids2], 7, GREEDY, eos_id=eot)  # the conversation re-prefilled
    assert reply2 == whole.tokens[0, : whole.lengths[0]].tolist() and len(reply2) >= 2


def test_chat_past_the_context_keeps_the_latest_whole_turns_and_the_system_message(chat_data):
    out, _ = chat_data
    ds = TokenDataset(out)
    tok, template = ds.tokenizer, NAMED["chatml"]
    cfg = tiny_config(out, model={"vocab_size": ds.vocab_size, "n_layers": 1, "max_seq_len": 128}).model
    leaves, treedef = jax.tree.flatten(init_params(cfg, jax.random.PRNGKey(0)))  # noise: replies that vary by turn
    params = jax.tree.unflatten(treedef, [w + 0.3 * jax.random.normal(jax.random.PRNGKey(i), w.shape)
                                          for i, w in enumerate(leaves)])
    eot = tok.encode(template.end_of_turn)[0]
    lines = ["count to 3", "thanks", "count to 5", "thanks", "count to 1", "thanks", "count to 2"]
    replies, notes = io.StringIO(), io.StringIO()
    messages = chat_loop(cfg, params, tok, template, 6, lines=lines, out=replies, err=notes, system="you are welcome")
    assert messages[0] == {"role": "system", "content": "you are welcome"} and len(messages) == 1 + 2 * len(lines)
    slides = [(int(t), int(d)) for t, d in re.findall(r"user turn (\d+) .* dropped its oldest (\d+) ", notes.getvalue())]
    assert len(slides) == len(notes.getvalue().splitlines())
    assert slides and all(dropped >= 1 for _, dropped in slides)

    def ids(window):
        return [ds.eos_id] + tok.encode(render_text(template, messages[:1] + window, add_generation_prompt=True))

    start = 1  # the first message of the window after the system one
    for turn, dropped in slides:
        start += 2 * dropped
        user = 2 * turn - 1  # turn k's user message
        window = messages[start: user + 1]
        assert window[0]["role"] == "user" and len(ids(window)) + 6 <= cfg.max_seq_len  # it fits with the reply's room
        assert len(ids(messages[start - 2: user + 1])) + 6 > cfg.max_seq_len  # one turn more would not
        fresh = generate(cfg, params, [ids(window)], 6, GREEDY, eos_id=eot)  # the reply after the slide: a new cache
        assert tok.decode(fresh.tokens[0, : fresh.lengths[0]].tolist()).removesuffix(template.end_of_turn) \
            == messages[user + 1]["content"]


def _bad(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_bad_chat_input_is_one_line_and_writes_nothing(tmp_path, capsys, byte_data):
    conv = tmp_path / "bad.jsonl"
    conv.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"content": "no role"}]}) + "\n")
    out = tmp_path / "out"
    base = ["prepare", "--source", "chat", "--files", str(conv), "--out", str(out)]
    assert "lacks 'role'" in _bad(capsys, base + ["--chat-template", "chatml"])
    assert "unknown" in _bad(capsys, base + ["--chat-template", "vicuna"])
    _write_conversations(conv, 3)
    err = _bad(capsys, base + ["--chat-template", "chatml", "--tokenizer-from", str(byte_data)])
    assert "lacks the chat template's special tokens <|im_start|>, <|im_end|>" in err
    assert not out.exists()
    run = tmp_path / "run"  # a run directory's marker: the flags are checked before its config is read
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert "--system go with --chat" in _bad(capsys, ["generate", str(run), "--prompt", "x", "--system", "terse"])


def test_a_sentencepiece_tokenizer_trained_here_keeps_the_specials_whole(tmp_path):
    rows = _write_conversations(tmp_path / "conv.jsonl", 16)
    out = tmp_path / "sp"
    assert main(["prepare", "--source", "chat", "--files", str(tmp_path / "conv.jsonl"), "--chat-template", "llama3",
                 "--tokenizer", "sentencepiece", "--vocab-size", "300", "--val-fraction", "0.25", "--out", str(out)]) == 0
    ds = TokenDataset(out)
    tok = ds.tokenizer
    assert all(len(tok.encode(s)) == 1 for s in NAMED["llama3"].specials)
    tokens, mask = np.concatenate(ds.shards("train")), np.concatenate(ds.mask_shards("train"))
    kept = tok.decode(tokens[mask == 1])
    assert kept.count("<|eot_id|>") == 2 * ds.meta["splits"]["train"]["documents"] and "<|start_header_id|>" not in kept
    assert "you are welcome<|eot_id|>" in kept and len(rows) == 16
