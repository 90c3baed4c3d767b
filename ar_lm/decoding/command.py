"""`ar-lm generate`: load a run (and a draft), pick the decoder, print text or JSON."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from ar_lm.config import ModelConfig
from ar_lm.data.chat import ChatTemplate, load_template
from ar_lm.data.tokenizers import load_tokenizer, with_specials
from ar_lm.decoding import media
from ar_lm.decoding.beam import beam_search
from ar_lm.decoding.chat import chat_loop
from ar_lm.decoding.decoder import generate, generate_sliding, prepare_prompts, sliding_chunks
from ar_lm.decoding.sampling import Sampling
from ar_lm.decoding.speculative import speculative_generate
from ar_lm.decoding.streaming import stream
from ar_lm.errors import require
from ar_lm.model.quantize import check_quantizable, quantize_params
from ar_lm.parallel.mesh import inference_mesh, logical_rules, make_mesh, mesh_context
from ar_lm.training import rundir
from ar_lm.training.checkpoint import restore_latest_params


@dataclasses.dataclass
class LoadedRun:
    cfg: ModelConfig
    params: object
    tokenizer: object
    tokenizer_meta: dict


def decode_mesh(run_dir: str | Path):
    """Mesh and rules for decoding a run: one prompt, so no data split; the run's tensor parallelism when
    this host has enough devices (`inference_mesh`)."""
    mesh_cfg = inference_mesh(rundir.load_run_config(Path(run_dir)).mesh, batch=1)
    return make_mesh(mesh_cfg), logical_rules(mesh_cfg)


def load_run(run_dir: str | Path, mesh=None, rules=None, quantize=None) -> LoadedRun:
    """The model config and tokenizer of a run (None for an imported model whose tokenizer ar_lm does
    not read), and with a mesh its latest-checkpoint parameters placed on it. `quantize` ("int8"): checked
    without a mesh, and with one the parameters are quantised once (`ar_lm.model.quantize`)."""
    run_dir = Path(run_dir).absolute()
    cfg = rundir.load_run_config(run_dir)
    if quantize is not None:
        check_quantizable(cfg.model, quantize)
    tok_meta_path = run_dir / rundir.TOKENIZER / "metadata.json"
    tokenizer, tok_meta = None, {}
    if tok_meta_path.is_file():
        tok_meta = json.loads(tok_meta_path.read_text())["tokenizer"]
        tokenizer = load_tokenizer(run_dir / rundir.TOKENIZER, tok_meta["kind"])
        require(tokenizer.vocab_size == cfg.model.vocab_size,
                f"run {run_dir} has a tokenizer of {tokenizer.vocab_size} tokens but a model of {cfg.model.vocab_size}")
    if mesh is None:
        return LoadedRun(cfg.model, None, tokenizer, tok_meta)
    _, params = restore_latest_params(run_dir, cfg, mesh, rules)
    if quantize is not None:
        params = quantize_params(cfg.model, params, quantize)
    return LoadedRun(cfg.model, params, tokenizer, tok_meta)


def parse_token_ids(text: str) -> list[int]:
    """'1, 2 3' -> [1, 2, 3] (commas and/or spaces)."""
    parts = text.replace(",", " ").split()
    require(parts and all(p.lstrip("-").isdigit() for p in parts),
            f"--prompt-ids takes integers separated by commas or spaces, got {text!r}")
    return [int(p) for p in parts]


def _check_same_tokenizer(target: LoadedRun, draft: LoadedRun, draft_dir) -> None:
    require(draft.cfg.vocab_size == target.cfg.vocab_size,
            f"draft run {draft_dir} has a vocabulary of {draft.cfg.vocab_size} tokens but the target has "
            f"{target.cfg.vocab_size}: use a draft trained with the same tokenizer")
    require(draft.tokenizer_meta.get("sha256") == target.tokenizer_meta.get("sha256"),
            f"draft run {draft_dir} uses a different tokenizer than the target (same size, other contents): "
            "use a draft trained with the same tokenizer")


class TextStream:
    """Prints the decoded text of a growing token list, only ever extending what is on the screen: an
    incomplete UTF-8 tail (decoded as U+FFFD) is held back until the next token completes it, and a decode
    that changes text already printed is held back too. Should the final text still disagree with the
    screen, it is printed whole on a line of its own rather than spliced onto the wrong prefix."""

    def __init__(self, tokenizer, eos_id, out=None):
        self.tokenizer, self.eos_id, self.tokens, self.printed = tokenizer, eos_id, [], ""
        self.out = out or sys.stdout

    def add(self, tokens, final: bool = False) -> None:
        self.tokens += [int(t) for t in tokens if int(t) != self.eos_id]
        text = self.tokenizer.decode(self.tokens)
        if not final:
            text = text.rstrip("\ufffd")
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
        elif final:
            self.out.write("\n" + text)
        else:
            return
        self.out.flush()
        self.printed = text


def _sampling(args, vocab_limit: int = 0) -> Sampling:
    """The sampler the flags ask for (vocab_limit: only ids below it), checking the flags that do not combine."""
    sampling_flags = {"--temperature": args.temperature, "--top-k": args.top_k, "--top-p": args.top_p,
                      "--min-p": args.min_p}
    sampling = Sampling.create(1.0 if args.temperature is None else args.temperature, args.top_k,
                               1.0 if args.top_p is None else args.top_p, 0.0 if args.min_p is None else args.min_p,
                               vocab_limit)
    require(args.num_samples >= 1, f"--num-samples must be >= 1, got {args.num_samples}")
    require(args.beams >= 1, f"--beams must be >= 1, got {args.beams}")
    if args.beams > 1:
        given = [flag for flag, value in sampling_flags.items() if value is not None]
        require(not given, f"beam search is deterministic: drop {', '.join(given)} or --beams")
        require(args.draft is None, "beam search and speculative decoding do not combine: drop --draft or --beams")
        require(args.num_samples == 1, "beam search returns --beams hypotheses: drop --num-samples")
    return sampling


def generate_command(args) -> int:
    """`ar-lm generate RUN_DIR --prompt TEXT | --prompt-ids IDS | --image-out PNG | --audio-out WAV ...`
    (see `ar_lm.cli`)."""
    if args.image_out is not None or args.audio_out is not None:
        return _media_command(args)
    if args.chat:
        return _chat_command(args)
    stray = [flag for flag, value in (("--prompt-image", args.prompt_image), ("--prompt-rows", args.prompt_rows),
                                      ("--seconds", args.seconds)) if value is not None]
    require(not stray, f"{', '.join(stray)} go with --image-out or --audio-out: add one or drop them")
    stray = [flag for flag, value in (("--system", args.system), ("--chat-template", args.chat_template))
             if value is not None]
    require(not stray, f"{', '.join(stray)} go with --chat: add it or drop them")
    sampling = _sampling(args)
    require((args.prompt is None) != (args.prompt_ids is None), "give --prompt TEXT or --prompt-ids IDS (one of them)")
    target = load_run(args.run_dir, quantize=args.quantize)  # config and tokenizer: check before restoring
    if args.draft is not None:
        _check_same_tokenizer(target, load_run(args.draft, quantize=args.quantize), args.draft)
    tok = target.tokenizer
    require(tok is not None or args.prompt is None,
            f"run {args.run_dir} has no text tokenizer (an imported model's tokenizer ar_lm does not read): "
            "give --prompt-ids")
    eos_id = args.eos_id if args.eos_id is not None else (tok.eos_id if tok is not None else None)
    prompt_ids, n = _text_prompt(args, target, eos_id)  # checked before anything is restored or printed
    mesh, rules = decode_mesh(args.run_dir)
    target = load_run(args.run_dir, mesh, rules, args.quantize)  # now with its parameters
    draft = None if args.draft is None else load_run(args.draft, mesh, rules, args.quantize)
    t0 = time.perf_counter()
    with mesh_context(mesh, rules):
        if not (args.beams > 1 or args.json or args.num_samples > 1 or args.prompt is None):
            return _stream_text(args, target, draft, prompt_ids, n, sampling, eos_id, t0)
        samples, extra = _decode(args, target, draft, prompt_ids, n, sampling, eos_id)
    _print_samples(args, samples, extra, prompt_ids, tok, eos_id)
    if not args.json:
        _report(sum(len(s["tokens"]) for s in samples), len(samples), time.perf_counter() - t0, extra,
                args.draft_tokens)
    return 0


def _text_prompt(args, target: LoadedRun, eos_id) -> tuple[list[int], int]:
    """The prompt's token ids and the number of new tokens, checked against the run (`prepare_prompts`)."""
    if args.prompt_ids is not None:  # ids as given, e.g. from the model's own (Hugging Face) tokenizer
        prompt_ids = parse_token_ids(args.prompt_ids)
    else:  # the prompt starts a document: after the begin-of-sequence id (imported Llama), else after EOS
        prompt_ids = [target.tokenizer_meta.get("bos_id", eos_id)] + list(target.tokenizer.encode(args.prompt))
    ctx = target.cfg.max_seq_len
    n = args.max_new_tokens if args.max_new_tokens is not None else max(1, min(64, ctx - len(prompt_ids)))
    prepare_prompts(target.cfg, [prompt_ids], max(1, ctx - len(prompt_ids)) if _slides(args, ctx, prompt_ids, n) else n)
    return prompt_ids, n


def _slides(args, ctx: int, prompt_ids, n: int) -> bool:
    """Whether the request goes past the context by a sliding window (`generate_sliding`); beams and
    speculative decoding stay within it."""
    return len(prompt_ids) + n > ctx and args.beams == 1 and args.draft is None


def _chat_command(args) -> int:
    """`--chat`: a conversation on stdin/stdout with the template the run's data was prepared with (or
    --chat-template), reusing the KV cache across turns (`ar_lm.decoding.chat`)."""
    given = [f for f, v in (("--prompt", args.prompt), ("--prompt-ids", args.prompt_ids), ("--draft", args.draft),
                            ("--json", args.json or None)) if v is not None] + (["--beams"] if args.beams > 1 else [])
    require(not given, f"--chat reads the conversation from stdin: drop {', '.join(given)}")
    sampling = _sampling(args)
    target = load_run(args.run_dir, quantize=args.quantize)
    require(target.tokenizer is not None, f"run {args.run_dir} has no text tokenizer: --chat needs one")
    saved = json.loads((Path(args.run_dir) / rundir.TOKENIZER / "metadata.json").read_text()).get("chat_template")
    require(saved is not None or args.chat_template, f"run {args.run_dir} was not trained on chat data (no chat "
            "template in its tokenizer metadata): give --chat-template NAME|tokenizer_config.json")
    template = load_template(args.chat_template) if args.chat_template else ChatTemplate.from_json(saved)
    with_specials(target.tokenizer, template.specials, fixed=True)  # the run's tokenizer must hold them
    mesh, rules = decode_mesh(args.run_dir)
    target = load_run(args.run_dir, mesh, rules, args.quantize)
    with mesh_context(mesh, rules):
        chat_loop(target.cfg, target.params, target.tokenizer, template, args.max_new_tokens or 256, sampling,
                  args.seed, system=args.system)
    return 0


def _media_command(args) -> int:
    """`--image-out`: K images (completing --prompt-image's top rows) as one grid PNG; `--audio-out`: a WAV.
    Every flag is checked before the parameters are restored; the file is written once generation is done."""
    target = load_run(args.run_dir, quantize=args.quantize)
    spec = media.media_spec(args.run_dir)
    media.check_media_args(args, spec, args.run_dir)
    sampling = _sampling(args, vocab_limit=spec.levels)
    sampling.check_vocab(target.cfg.vocab_size)
    prompt_levels = [] if args.prompt_image is None else media.image_prompt(spec, args.prompt_image, args.prompt_rows)
    mesh, rules = decode_mesh(args.run_dir)
    target = load_run(args.run_dir, mesh, rules, args.quantize)
    t0 = time.perf_counter()
    with mesh_context(mesh, rules):
        if args.image_out is not None:
            ids_KxT, n_tokens = media.generate_images(target.cfg, target.params, spec, prompt_levels,
                                                      args.num_samples, sampling, args.seed)
        else:
            codes = media.generate_audio(target.cfg, target.params, spec, args.seconds, sampling, args.seed)
    seconds = time.perf_counter() - t0
    if args.image_out is not None:
        media.write_images(args.image_out, spec, ids_KxT)
        out = {"path": str(args.image_out), "samples": args.num_samples, "tokens": n_tokens}
    else:
        media.write_audio(args.audio_out, spec, codes)
        out = {"path": str(args.audio_out), "samples": 1, "tokens": len(codes),
               "audio_seconds": len(codes) / spec.sample_rate}
    print(json.dumps({**out, "seconds": round(seconds, 3)}))
    return 0


def _decode(args, target: LoadedRun, draft, prompt_ids, n, sampling, eos_id) -> tuple[list[dict], dict]:
    """(samples, extra): beam hypotheses (with scores), or samples (speculative with a draft)."""
    cfg = target.cfg
    if args.beams > 1:
        res = beam_search(cfg, target.params, [prompt_ids], n, args.beams,
                          length_penalty_alpha=args.length_penalty, eos_id=eos_id)
        return [dict(tokens=res.sequences[0, i, : res.lengths[0, i]], logprobs=res.logprobs[0, i, : res.lengths[0, i]],
                     score=float(res.scores[0, i])) for i in range(args.beams)], {}
    prompts = [prompt_ids] * args.num_samples
    if draft is None and _slides(args, cfg.max_seq_len, prompt_ids, n):  # each token sees the last ctx - 1
        res, extra = generate_sliding(cfg, target.params, prompts, n, sampling, seed=args.seed,
                                      keep=cfg.max_seq_len - 1, eos_id=eos_id), {}
    elif draft is None:
        res, extra = generate(cfg, target.params, prompts, n, sampling, seed=args.seed, eos_id=eos_id), {}
    else:
        res = speculative_generate(cfg, target.params, draft.cfg, draft.params, prompts, n, sampling,
                                   draft_tokens=args.draft_tokens, seed=args.seed, eos_id=eos_id)
        extra = {"acceptance_rate": res.acceptance_rate, "target_passes": res.target_passes}
    return [dict(tokens=res.tokens[i, : res.lengths[i]], logprobs=res.logprobs[i, : res.lengths[i]])
            for i in range(args.num_samples)], extra


def _stream_text(args, target: LoadedRun, draft, prompt_ids, n, sampling, eos_id, t0) -> int:
    """One sample, streamed to the terminal as it is produced."""
    out, extra = TextStream(target.tokenizer, eos_id), {}
    sys.stdout.write(args.prompt)
    ctx = target.cfg.max_seq_len
    if _slides(args, ctx, prompt_ids, n):  # past the context: each token sees the last ctx - 1 tokens
        parts = ((g.tokens[0], g.logprobs[0]) for g in sliding_chunks(target.cfg, target.params, [prompt_ids], n,
                                                                      sampling, seed=args.seed, keep=ctx - 1))
    else:
        parts = stream(target.cfg, target.params, prompt_ids, n, sampling, seed=args.seed, eos_id=eos_id,
                       draft=None if draft is None else (draft.cfg, draft.params), draft_tokens=args.draft_tokens,
                       stats=extra)
    n_tokens = 0
    for tokens, _ in parts:
        tokens = [int(t) for t in tokens]
        ended = eos_id in tokens
        tokens = tokens[: tokens.index(eos_id) + 1] if ended else tokens
        out.add(tokens)
        n_tokens += len(tokens)
        if ended:
            break
    out.add([], final=True)
    sys.stdout.write("\n")
    _report(n_tokens, 1, time.perf_counter() - t0, extra, args.draft_tokens)
    return 0


def _print_samples(args, samples: list[dict], extra: dict, prompt_ids, tok, eos_id) -> None:
    text = (lambda ids: tok.decode([t for t in ids if t != eos_id])) if tok is not None else None
    if args.json:
        print(json.dumps({
            **({"prompt": args.prompt} if args.prompt is not None else {}), "prompt_tokens": prompt_ids, **extra,
            "samples": [{**({"text": text(s["tokens"].tolist())} if text else {}),
                         "tokens": s["tokens"].tolist(), "logprobs": [round(float(x), 6) for x in s["logprobs"]],
                         **({"score": s["score"]} if "score" in s else {})} for s in samples],
        }))
        return
    for i, s in enumerate(samples):
        label = f"beam {i} (score {s['score']:.4f})" if "score" in s else f"sample {i}"
        print(f"--- {label} ---")
        if args.prompt is not None:
            print(args.prompt + text(s["tokens"].tolist()))
        else:  # ids in, ids out (and the text too when the run has a tokenizer)
            print(" ".join(str(t) for t in s["tokens"].tolist()))
            if text:
                print(text(prompt_ids + s["tokens"].tolist()))


def _report(n_tokens: int, rows: int, seconds: float, extra: dict, k: int) -> None:
    line = f"[generate] {n_tokens} tokens in {seconds:.2f} s (including compilation)"
    if "acceptance_rate" in extra:
        line += (f"; speculative: acceptance rate {extra['acceptance_rate']:.3f} with {k} draft tokens, "
                 f"{n_tokens / rows / max(extra['target_passes'], 1):.2f} tokens per row per target pass")
    print(line, file=sys.stderr)
