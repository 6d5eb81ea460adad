"""A tokenizer's chat template, rendered as transformers renders it: chat ``messages`` to the text a
chat model was trained on.

The template is the tokenizer's own, found beside its tokenizer.json as transformers finds it
(``PreTrainedTokenizerBase.from_pretrained`` in transformers/tokenization_utils_base.py): a
``chat_template.jinja`` file first, else ``tokenizer_config.json``'s ``chat_template`` (a string, or
named templates as a dict or as a list of ``{"name", "template"}``, of which "default" is taken, as
``get_chat_template`` does). The special tokens (bos_token, eos_token, unk_token, sep_token,
pad_token, cls_token, mask_token) are template variables, as ``apply_chat_template`` passes
``tokenizer.special_tokens_map``: from tokenizer_config.json, where missing from
special_tokens_map.json, a token written as ``{"content": ...}`` by its content.

The jinja2 environment follows transformers/utils/chat_template_utils.py
(``_cached_compile_jinja_template`` and ``render_jinja_template``, transformers 5): an
``ImmutableSandboxedEnvironment`` (templates come from model repositories: untrusted code) with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension and the
``{% generation %}`` block (its character spans recorded, as ``AssistantTracker`` does),
``raise_exception``, ``strftime_now``, a ``tojson`` filter that does not escape HTML, a ``dict``
and a ``namespace`` that refuse underscore names; messages with None values dropped and reasoning
aliased to ``reasoning_content``/``thinking`` as there. moedsl never imports transformers; the tests
compare the text with its ``apply_chat_template(messages, tokenize=False)``.
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Optional

from moedsl.errors import UserError

CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # transformers 5 saves the default template here, beside the config
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' _REASONING_FIELDS


class ChatTemplate:
    """``render(messages, add_generation_prompt=False) -> text``; ``spans(messages)`` -> the text and
    the character spans of each ``{% generation %}`` block (templates that mark the assistant's text)."""

    def __init__(self, source: str, special_tokens: dict, where: str):
        self.source, self.special_tokens, self.where = source, dict(special_tokens), where
        self.template = _compile(source)

    @property
    def marks_generation(self) -> bool:
        """Whether the template marks the assistant's text with ``{% generation %}`` blocks."""
        return re.search(r"\{\%-?\s*generation\s*-?\%\}", self.source) is not None

    def _variables(self, messages: list, add_generation_prompt: bool) -> dict:
        chat = _alias_reasoning([{k: v for k, v in m.items() if v is not None} for m in messages])
        return {"messages": chat, "tools": None, "documents": None, "add_generation_prompt": add_generation_prompt,
                **self.special_tokens}

    def render(self, messages: list, add_generation_prompt: bool = False) -> str:
        try:
            return self.template.render(**self._variables(messages, add_generation_prompt))
        except Exception as e:  # noqa: BLE001 - raise_exception, or the template failing on this conversation
            raise TemplateRefused(f"the chat template ({self.where}) refused the conversation: {e}") from None

    def spans(self, messages: list) -> tuple[str, list]:
        """(text, [(start, end)] character spans of the ``{% generation %}`` blocks), as
        transformers' ``_render_with_assistant_indices``."""
        blocks, spans = [], []
        try:
            with self.template.environment.activate_tracker(blocks, spans):
                for block in self.template.generate(**self._variables(messages, False)):
                    blocks.append(block)
        except Exception as e:  # noqa: BLE001 - as in render
            raise TemplateRefused(f"the chat template ({self.where}) refused the conversation: {e}") from None
        return "".join(blocks), spans


class TemplateRefused(UserError):
    """The template raised (``raise_exception``, e.g. roles out of order) or failed on a conversation."""


def find_chat_template(tokenizer_json) -> Optional[ChatTemplate]:
    """The chat template of the tokenizer whose tokenizer.json is ``tokenizer_json``, from the files
    beside it (module docstring); None where it has none. An unreadable config, a template that is
    not a string or has no "default" among several, or jinja2 missing: one ``UserError`` line."""
    folder = Path(tokenizer_json).parent
    config = _read_object(folder / CONFIG)
    tokens = special_tokens(tokenizer_json)
    file = folder / TEMPLATE_FILE
    if file.is_file():
        source, where = file.read_text(encoding="utf-8"), str(file)
    else:
        source, where = config.get("chat_template"), f"{folder / CONFIG} chat_template"
        if isinstance(source, list):  # [{"name", "template"}], as older transformers saved several
            try:
                source = {t["name"]: t["template"] for t in source}
            except (TypeError, KeyError):
                raise UserError(f"{where}: a list that is not of {{\"name\", \"template\"}} objects") from None
        if isinstance(source, dict):
            if "default" not in source:
                raise UserError(f"{where}: several templates ({', '.join(sorted(map(str, source)))}) and no "
                                "'default' among them")
            source, where = source["default"], f"{where}['default']"
        if source is None:
            return None
        if not isinstance(source, str):
            raise UserError(f"{where}: a {type(source).__name__}, not a template")
    try:
        import jinja2
    except ImportError:
        raise UserError(f"{where}: rendering the chat template needs jinja2: pip install 'moedsl[data]'") from None
    if tuple(int(x) for x in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):  # as transformers refuses
        raise UserError(f"{where}: jinja2 {jinja2.__version__} has known sandbox escapes and a template is untrusted "
                        "code: pip install 'jinja2>=3.1.6'")
    try:
        return ChatTemplate(source, tokens, where)
    except Exception as e:  # noqa: BLE001 - jinja2.TemplateSyntaxError and the like: the template is broken
        raise UserError(f"{where}: not a template jinja2 reads ({type(e).__name__}: {e})") from None


def special_tokens(tokenizer_json) -> dict:
    """{"bos_token": "<s>", ...}: the special tokens named beside ``tokenizer_json``, as
    transformers' ``special_tokens_map`` (tokenizer_config.json, else special_tokens_map.json;
    a token written as ``{"content": ...}`` by its content)."""
    folder = Path(tokenizer_json).parent
    config, legacy = _read_object(folder / CONFIG), _read_object(folder / SPECIAL_TOKENS_MAP)
    tokens = {}
    for name in SPECIAL_TOKENS:
        value = config.get(name) if config.get(name) is not None else legacy.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens


def _read_object(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: not a JSON object")
    return value


def _alias_reasoning(chat: list) -> list:
    """transformers' ``_alias_reasoning_fields``: a message's reasoning under any of its names is
    also ``reasoning_content`` (what templates read) and ``thinking`` (gpt-oss templates)."""
    out = []
    for m in chat:
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        out.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
    return out


@lru_cache(maxsize=16)
def _compile(source: str):
    """The template compiled in transformers' environment (chat_template_utils.py,
    ``_cached_compile_jinja_template``)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class AssistantTracker(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: while tracking, the character span of each block."""

        tags = {"generation"}

        def __init__(self, environment):
            super().__init__(environment)
            environment.extend(activate_tracker=self.activate_tracker)
            self._tracking = ContextVar("assistant_tracker", default=None)

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generation_support"), [], [], body).set_lineno(lineno)

        @jinja2.pass_eval_context
        def _generation_support(self, context, caller):
            rv = caller()
            tracking = self._tracking.get()
            if tracking is not None:
                blocks, spans = tracking
                start = len("".join(blocks))
                spans.append((start, start + len(rv)))
            return rv

        @contextmanager
        def activate_tracker(self, blocks: list, spans: list):
            token = self._tracking.set((blocks, spans))
            try:
                yield
            finally:
                self._tracking.reset(token)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja2's own tojson escapes HTML characters; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        """``dict(...)`` in a template, with no attribute that leads out of the sandbox."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """``namespace(...)`` that refuses underscore-prefixed attributes (CPython internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[AssistantTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(source)
