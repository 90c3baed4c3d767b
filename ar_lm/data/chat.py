"""Chat templates: message lists rendered to text with the spans that carry loss (the assistant turns).

A template is a Jinja string rendered the way `transformers`' `apply_chat_template` does (a sandboxed
environment with `trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, a non-escaping `tojson`;
`messages`, `add_generation_prompt` and the special tokens `bos_token`, `eos_token` as variables): the
named ones (`chatml`, `llama3`, `gemma`) are the published templates of those models, and any other comes
from a Hugging Face `tokenizer_config.json` (`chat_template`, `bos_token`, `eos_token`, `added_tokens_decoder`).
The loss spans are found by rendering once more with each assistant content between two private-use
sentinels; a span covers the content and the end-of-turn string that follows it. `specials` are the
template's boundary strings, which an ar_lm tokenizer must hold as single tokens (`tokenizers.with_specials`).
Files read here are JSON; the template is never executed outside the sandbox.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ar_lm.data.sources import Document, expand_paths, jsonl_records
from ar_lm.errors import UserError, require
from ar_lm.io import sha256_file

ROLES = ("system", "user", "assistant")
_OPEN, _CLOSE = "\ue000", "\ue001"  # sentinels around assistant content (private-use code points)

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
         "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template with its special tokens; `end_of_turn` ends an assistant turn (generation stops
    there); `specials`: the strings that must be single tokens."""

    name: str
    source: str
    bos_token: str = ""
    eos_token: str = ""
    end_of_turn: str = ""
    specials: tuple[str, ...] = ()

    def to_json(self) -> dict:
        """What a dataset's metadata (source.chat_template) and a run's tokenizer directory record."""
        return {"name": self.name, "source": self.source, "bos_token": self.bos_token, "eos_token": self.eos_token,
                "end_of_turn": self.end_of_turn, "specials": list(self.specials)}

    @staticmethod
    def from_json(data: dict) -> "ChatTemplate":
        return ChatTemplate(**{**data, "specials": tuple(data.get("specials", ()))})


NAMED = {
    "chatml": ChatTemplate("chatml", CHATML, "", "<|im_end|>", "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    "llama3": ChatTemplate("llama3", LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>",
                           ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "gemma": ChatTemplate("gemma", GEMMA, "<bos>", "<eos>", "<end_of_turn>",
                          ("<bos>", "<start_of_turn>", "<end_of_turn>")),
}


@dataclass(frozen=True)
class Rendered:
    """Rendered text and the character spans [start, stop) that carry loss (assistant content + end of turn)."""

    text: str
    spans: tuple[tuple[int, int], ...]


def load_template(spec: str) -> ChatTemplate:
    """A named template (`chatml`, `llama3`, `gemma`) or the `chat_template` of a `tokenizer_config.json`."""
    if spec in NAMED:
        return NAMED[spec]
    path = Path(spec)
    require(path.suffix == ".json" and path.is_file(),
            f"chat template {spec!r} is unknown: use one of {', '.join(NAMED)} or a tokenizer_config.json file")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON: give a Hugging Face tokenizer_config.json") from None
    require(isinstance(config, dict), f"{path} is not a tokenizer_config.json object")
    source = config.get("chat_template")
    if isinstance(source, list):  # several named templates: the default one
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    if source is None and (path.parent / "chat_template.jinja").is_file():  # where transformers >= 4.50 saves it
        source = (path.parent / "chat_template.jinja").read_text()
    require(isinstance(source, str) and source, f"{path} has no chat_template string: give a chat model's config")
    bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    added = [_token_text(t) for t in (config.get("added_tokens_decoder") or {}).values()] + _added_tokens(path.parent)
    specials = tuple(dict.fromkeys(t for t in [bos, eos, *added] if t and (t in source or t in (bos, eos))))
    ends = [t for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", eos) if t and t in source + eos]
    return ChatTemplate(path.as_posix(), source, bos, eos, ends[0] if ends else eos, specials)


def _added_tokens(directory: Path) -> list[str]:
    """The special added tokens of a sibling tokenizer.json (a fast tokenizer's file), if there is one."""
    try:
        added = json.loads((directory / "tokenizer.json").read_text()).get("added_tokens") or []
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return []
    return [t.get("content", "") for t in added if isinstance(t, dict) and t.get("special")]


def _token_text(token) -> str:
    """A tokenizer_config token: a string or an AddedToken dict ({"content": ...})."""
    return token.get("content", "") if isinstance(token, dict) else (token or "")


def check_messages(messages, where: str) -> list[dict]:
    """The messages as plain dicts; a UserError naming `where` for a malformed one."""
    require(isinstance(messages, list) and messages, f"{where}: 'messages' must be a non-empty list of "
            "{\"role\", \"content\"} objects")
    for i, m in enumerate(messages):
        require(isinstance(m, dict) and "role" in m, f"{where}: message {i} lacks 'role': give each message a role "
                f"({', '.join(ROLES)})")
        require(m["role"] in ROLES, f"{where}: message {i} has role {m['role']!r}: use one of {', '.join(ROLES)}")
        require(isinstance(m.get("content"), str), f"{where}: message {i} lacks a string 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


def render_text(template: ChatTemplate, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The template applied to `messages`, as `apply_chat_template(..., tokenize=False)` renders it."""
    import jinja2

    try:
        compiled = _environment().from_string(template.source)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                               documents=None, bos_token=template.bos_token, eos_token=template.eos_token)
    except jinja2.exceptions.TemplateError as e:
        raise UserError(f"chat template {template.name} refused the conversation: {e}") from None


def render(template: ChatTemplate, messages: list[dict], add_generation_prompt: bool = False) -> Rendered:
    """Text and loss spans: assistant contents (and the end-of-turn string right after each). Templates that
    trim the content (`| trim`) are matched by marking the stripped content."""
    text = render_text(template, messages, add_generation_prompt)
    for strip in (False, True):
        marked = render_text(template, [{**m, "content": _OPEN + (m["content"].strip() if strip else m["content"])
                                         + _CLOSE} if m["role"] == "assistant" else m for m in messages],
                             add_generation_prompt)
        if marked.replace(_OPEN, "").replace(_CLOSE, "") == text:
            return Rendered(text, _spans(template, marked, text))
    raise UserError(f"chat template {template.name} does not render assistant content verbatim: the loss mask "
                    "cannot follow it")


def _spans(template: ChatTemplate, marked: str, text: str) -> tuple[tuple[int, int], ...]:
    spans, pos = [], 0
    while (i := marked.find(_OPEN, pos)) >= 0:
        j = marked.find(_CLOSE, i)
        start = i - 2 * len(spans)  # the sentinels before i are not in `text`
        stop = start + j - i - 1
        if template.end_of_turn and text.startswith(template.end_of_turn, stop):
            stop += len(template.end_of_turn)
        spans.append((start, stop))
        pos = j + 1
    return tuple(spans)


class ChatCorpus:
    """Conversations from .jsonl files, one {"messages": [...]} per line, rendered with `template`: one document
    per conversation (named path:line, so the hash split is as for text) with its loss spans."""

    def __init__(self, patterns, template: ChatTemplate, flag: str = "--files"):
        require(patterns, f"--source chat needs {flag} CONVERSATIONS.jsonl [...]")
        self.template, self.paths = template, expand_paths(patterns, flag)
        for path in self.paths:
            require(path.suffix.lower() == ".jsonl", f"chat file {path} is not .jsonl: give one "
                    '{"messages": [...]} object per line')
        self._check()

    def _check(self) -> None:
        """Every line parsed and rendered once before anything is written."""
        require(any(True for _ in self), f"the chat files {', '.join(map(str, self.paths))} hold no conversation")

    def files(self) -> list[dict]:
        return [{"path": str(p.absolute()), "sha256": sha256_file(p)} for p in self.paths]

    def __iter__(self):
        for path in self.paths:
            for lineno, record in jsonl_records(path):
                where = f"{path}:{lineno}"
                require(isinstance(record, dict), f"{where}: a line must be an object {{\"messages\": [...]}}")
                r = render(self.template, check_messages(record.get("messages"), where))
                yield Document(f"{path.name}:{lineno}", r.text, spans=r.spans)
