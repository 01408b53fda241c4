"""orcd.chat: the model's chat template (Jinja, rendered as HF transformers does)
and safe encoding of conversations.

    tpl = ChatTemplate(md.get("tokenizer.chat_template"))      # None -> ChatML
    text = tpl.render([{"role": "user", "content": "hi"}])     # for display
    ids = encode_chat(tok, tpl, messages)                      # for the model

encode_chat never lets text supplied by the caller become control tokens:
message contents are rendered as sentinels and encoded as plain text, and
every other string in the messages and tools (roles, names, tool-call
arguments, tool definitions) has its control-token text replaced by a
placeholder before rendering and restored afterwards as plain text. Only
control-token text written by the template itself is encoded as control
tokens. Plain text between control tokens is encoded in one piece, so the ids
equal those of encoding the rendered string with special parsing whenever the
messages contain no control-token text.
"""
from __future__ import annotations

import json
import re
import secrets
from datetime import datetime
from typing import Optional

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Gemma's turn format (<start_of_turn>role ... <end_of_turn>, the assistant's role named
# "model", a system message folded into the first user turn), for files that carry no
# template but whose vocabulary is Gemma's (Gemma 3 270M's GGUF has none).
GEMMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set first_prefix = messages[0]['content'] + '\n\n' %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set first_prefix = '' %}{%- set turns = messages %}{%- endif %}"
    "{%- for message in turns %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\n' + (first_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}"
)
# The default template when the file has none, by the BOS token's text (the vocabulary's
# family); anything else gets ChatML.
_DEFAULT_BY_BOS = {"<bos>": ("Gemma", GEMMA_TEMPLATE)}


# Bounds on rendering a template (its code comes from the model file's author):
# every string / list / dict a template builds, and the rendered text, hold at most
# MAX_RENDER_ITEMS characters / items; a rendering stops after RENDER_SECONDS
# (checked at every loop iteration, call, filter and output chunk).
MAX_RENDER_ITEMS = 1 << 24
RENDER_SECONDS = 2.0
_MAX_POW_EXPONENT = 1024
_TEMPLATE_KEY = "tokenizer.chat_template"


class TemplateLimitError(Exception):
    """A template went past a rendering bound (size or time)."""


def _size(x) -> int:
    return len(x) if isinstance(x, (str, bytes, list, tuple, dict, set)) else 0


def _make_env():
    import functools
    import threading
    import time

    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTracker(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (used by some HF templates to
        mark assistant text): renders its body unchanged."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    class BoundedCodeGenerator(CodeGenerator):
        """Routes every loop iterable (through the _orcd_loop filter) and every `~`
        concatenation through the environment's checks."""

        def visit_Template(self, node, frame=None):
            for loop in node.find_all(nodes.For):
                if not (isinstance(loop.iter, nodes.Filter) and loop.iter.name == "_orcd_loop"):
                    loop.iter = nodes.Filter(loop.iter, "_orcd_loop", [], [], None, None, lineno=loop.lineno)
            super().visit_Template(node, frame)

        def visit_Concat(self, node, frame):
            self.write("environment.orcd_value(")
            super().visit_Concat(node, frame)
            self.write(")")

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        code_generator_class = BoundedCodeGenerator
        intercepted_binops = frozenset(["*", "+", "**"])

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self._state = threading.local()

        # -- per rendering
        def begin(self, seconds: float):
            self._state.deadline = time.monotonic() + seconds
            self._state.seconds = seconds

        def orcd_tick(self):
            deadline = getattr(self._state, "deadline", None)
            if deadline is not None and time.monotonic() > deadline:
                raise TemplateLimitError(f"rendering took longer than {self._state.seconds:g} s")

        def orcd_value(self, v):
            if _size(v) > MAX_RENDER_ITEMS:
                raise TemplateLimitError(f"a value of {_size(v):,} items (the bound is {MAX_RENDER_ITEMS:,})")
            return v

        def orcd_loop(self, iterable):
            for x in iterable:
                self.orcd_tick()
                yield x

        # -- sandbox hooks
        def call_binop(self, context, operator, left, right):
            self.orcd_tick()
            if operator == "*":
                for seq, k in ((left, right), (right, left)):
                    if _size(seq) and isinstance(k, int) and _size(seq) * k > MAX_RENDER_ITEMS:
                        raise TemplateLimitError(f"a repetition of {_size(seq):,} x {k:,} items "
                                                 f"(the bound is {MAX_RENDER_ITEMS:,})")
            elif operator == "+":
                if _size(left) + _size(right) > MAX_RENDER_ITEMS:
                    raise TemplateLimitError(f"a concatenation of {_size(left) + _size(right):,} items "
                                             f"(the bound is {MAX_RENDER_ITEMS:,})")
            elif operator == "**":
                if isinstance(right, (int, float)) and abs(right) > _MAX_POW_EXPONENT and \
                        isinstance(left, (int, float)) and abs(left) > 1:
                    raise TemplateLimitError(f"a power with exponent {right} (the bound is {_MAX_POW_EXPONENT})")
            return self.orcd_value(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own convention)
            __self.orcd_tick()
            _check_args(__obj, args, kwargs)
            return __self.orcd_value(super().call(__context, __obj, *args, **kwargs))

    def _check_args(fn, args, kwargs):
        """Before a call: no size argument past the bound, and no str.replace / str.join
        whose result would be past it."""
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_RENDER_ITEMS:
                raise TemplateLimitError(f"an argument {a:,} (the bound is {MAX_RENDER_ITEMS:,})")
        name = getattr(fn, "__name__", "")
        owner = getattr(fn, "__self__", None)
        text = old = new = None
        if name == "replace" and isinstance(owner, str) and len(args) >= 2:  # str.replace
            text, old, new = owner, args[0], args[1]
        elif name == "do_replace" and len(args) >= 4:  # the replace filter: (eval_ctx, s, old, new)
            text, old, new = args[1:4]
        if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
            n = (len(text) + 1) if not old else text.count(old)
            if len(text) + n * (len(new) - len(old)) > MAX_RENDER_ITEMS:
                raise TemplateLimitError(f"a replace() of {n:,} x {len(new):,} characters "
                                         f"(the bound is {MAX_RENDER_ITEMS:,})")
        if name == "join" and isinstance(owner, str) and args and isinstance(args[0], (list, tuple)) \
                and len(owner) * len(args[0]) > MAX_RENDER_ITEMS:  # str.join
            raise TemplateLimitError(f"a join() of {len(args[0]):,} items with a separator of "
                                     f"{len(owner):,} characters (the bound is {MAX_RENDER_ITEMS:,})")

    def bounded_filter(env, f):
        @functools.wraps(f)
        def run(*args, **kwargs):
            env.orcd_tick()
            _check_args(f, args, kwargs)
            if f.__name__ == "do_join" and args:  # (eval_ctx, value, d="", ...)
                seq = args[1] if len(args) > 1 else None
                d = args[2] if len(args) > 2 else kwargs.get("d", "")
                if isinstance(seq, (list, tuple)) and isinstance(d, str) and \
                        len(d) * len(seq) > MAX_RENDER_ITEMS:
                    raise TemplateLimitError(f"a join of {len(seq):,} items with a separator of "
                                             f"{len(d):,} characters (the bound is {MAX_RENDER_ITEMS:,})")
            return env.orcd_value(f(*args, **kwargs))
        return run

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # HF's override: no HTML escaping, unicode kept.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                             extensions=[GenerationTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.filters = {k: bounded_filter(env, f) for k, f in env.filters.items()}
    env.filters["_orcd_loop"] = env.orcd_loop
    return env


class ChatTemplate:
    """A chat template (Jinja source from the file's tokenizer.chat_template).
    template_str None or empty -> a default: Gemma's turns when bos_token is "<bos>"
    (a Gemma vocabulary), else ChatML. Rendering is sandboxed and bounded
    (MAX_RENDER_ITEMS, render_seconds); a template past a bound raises ValueError."""

    def __init__(self, template_str: Optional[str] = None, bos_token: str = "", eos_token: str = "",
                 render_seconds: float = RENDER_SECONDS):
        import jinja2

        self.default_name = None
        if template_str is None or (isinstance(template_str, str) and not template_str.strip()):
            self.default_name, template_str = _DEFAULT_BY_BOS.get(bos_token or "", ("ChatML", CHATML_TEMPLATE))
            self.is_default = True
        else:
            self.is_default = False
        if not isinstance(template_str, str):
            raise ValueError(f"chat template ({_TEMPLATE_KEY}) must be a str (got {type(template_str).__name__})")
        self.source = template_str
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self.render_seconds = float(render_seconds)
        self._env = _make_env()
        try:
            self._template = self._env.from_string(template_str)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"chat template ({_TEMPLATE_KEY}): syntax error at line {e.lineno}: "
                             f"{e.message}") from None

    def render(self, messages, add_generation_prompt: bool = True, tools=None, **extra) -> str:
        """The prompt text for `messages` (validated; see validate_messages)."""
        msgs = validate_messages(messages)
        return self._render(msgs, add_generation_prompt, tools, extra)

    def _render(self, msgs, add_generation_prompt, tools, extra) -> str:
        import jinja2

        ctx = dict(extra)
        ctx.update(messages=msgs, add_generation_prompt=bool(add_generation_prompt), tools=tools,
                   bos_token=self.bos_token, eos_token=self.eos_token)
        env = self._env
        parts, n = [], 0
        try:
            env.begin(self.render_seconds)
            for chunk in self._template.generate(**ctx):
                n += len(chunk)
                if n > MAX_RENDER_ITEMS:
                    raise TemplateLimitError(f"the rendered text is longer than {MAX_RENDER_ITEMS:,} characters")
                env.orcd_tick()
                parts.append(chunk)
        except TemplateLimitError as e:
            raise ValueError(f"chat template ({_TEMPLATE_KEY}) went past a rendering bound: {e}") from None
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"chat template ({_TEMPLATE_KEY}) error: "
                             f"{e.message if hasattr(e, 'message') else e}") from None
        except (MemoryError, RecursionError) as e:
            raise ValueError(f"chat template ({_TEMPLATE_KEY}) failed: {type(e).__name__}") from None
        except Exception as e:  # the template's own code failed (a TypeError in it, ...)
            raise ValueError(f"chat template ({_TEMPLATE_KEY}) failed: {type(e).__name__}: {e}") from None
        return "".join(parts)

    def __repr__(self):
        return f"<orcd.ChatTemplate {self.default_name + ' default' if self.is_default else f'{len(self.source)} chars'}>"


def validate_messages(messages) -> list:
    """Checks a conversation and returns shallow copies of its messages.

    Each message is a dict with "role" (non-empty str) and "content" (str; None
    is read as "" for assistant messages that only carry tool_calls). Other keys
    (name, tool_calls, ...) are passed to the template as they are."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts "
                         f"(got {type(messages).__name__})")
    if not messages:
        raise ValueError("messages must not be empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content' (got {type(m).__name__})")
        if "role" not in m:
            raise ValueError(f"messages[{i}] has no 'role'")
        role = m["role"]
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}]['role'] must be a non-empty str (got {role!r})")
        if "content" not in m:
            raise ValueError(f"messages[{i}] has no 'content'")
        content = m["content"]
        if content is None and m.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}]['content'] must be a str (got {type(content).__name__})")
        mm = dict(m)
        mm["content"] = content
        out.append(mm)
    return out


# ---------------------------------------------------------------- safe encoding

class _Defuser:
    """Replaces special-token text inside caller strings with placeholders
    (private-use characters plus a random nonce) and restores them."""

    def __init__(self, rx, nonce: str):
        self.rx = rx
        self.texts: list = []
        self.index: dict = {}
        self.pre = f"\ue000{nonce}:"
        self.restore_rx = re.compile(re.escape(self.pre) + r"(\d+)\ue001")

    def _ph(self, m) -> str:
        t = m.group(0)
        k = self.index.get(t)
        if k is None:
            k = self.index[t] = len(self.texts)
            self.texts.append(t)
        return f"{self.pre}{k}\ue001"

    def str(self, s: str) -> str:
        return self.rx.sub(self._ph, s) if self.rx is not None else s

    def tree(self, x):
        if isinstance(x, str):
            return self.str(x)
        if isinstance(x, dict):
            return {(self.str(k) if isinstance(k, str) else k): self.tree(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [self.tree(v) for v in x]
        return x

    def restore(self, s: str) -> str:
        if not self.texts:
            return s
        return self.restore_rx.sub(lambda m: self.texts[int(m.group(1))], s)


def encode_chat(tokenizer, template: ChatTemplate, messages, add_generation_prompt: bool = True,
                tools=None, max_bytes: Optional[int] = None, n_ctx: Optional[int] = None, **extra) -> list:
    """Token ids of the rendered conversation, where only control-token text
    written by the template becomes control tokens (see the module docstring).
    max_bytes: reject (ValueError) a conversation or rendering longer than this
    before tokenizing it (n_ctx: for the message)."""
    msgs = validate_messages(messages)
    if max_bytes is not None:
        n = sum(len(m["content"]) for m in msgs)
        if n > max_bytes:
            raise ValueError(f"messages of {n:,} characters cannot fit in n_ctx={n_ctx} tokens "
                             f"(at most {max_bytes:,} bytes)")
    rx = tokenizer.special_regex()
    nonce = secrets.token_hex(8)
    d = _Defuser(rx, nonce)

    # Everything except the contents: defused (roles, names, tool calls, tools, extra).
    base = []
    for m in msgs:
        mm = {k: (v if k == "content" else d.tree(v)) for k, v in m.items()}
        base.append(mm)
    tools_d = d.tree(tools) if tools is not None else None
    extra_d = {k: d.tree(v) for k, v in extra.items()}

    # Contents as sentinels (empty contents stay empty: templates test them).
    sent = {}
    with_sentinels = []
    for i, m in enumerate(base):
        mm = dict(m)
        if m["content"]:
            s = f"\ue002{nonce}:{i}\ue003"
            sent[s] = m["content"]
            mm["content"] = s
        with_sentinels.append(mm)
    rendered_s = template._render(with_sentinels, add_generation_prompt, tools_d, extra_d)

    pieces = []  # (text, is_template)
    if sent:
        srx = re.compile("|".join(re.escape(s) for s in sent))
        pos = 0
        for m in srx.finditer(rendered_s):
            if m.start() > pos:
                pieces.append((rendered_s[pos:m.start()], True))
            pieces.append((sent[m.group(0)], False))
            pos = m.end()
        if pos < len(rendered_s):
            pieces.append((rendered_s[pos:], True))
        # The template must have used the contents verbatim; check against a
        # rendering with the real contents.
        rendered_real = template._render(base, add_generation_prompt, tools_d, extra_d)
        if "".join(p for p, _ in pieces) != rendered_real:
            # It transformed them (strip, slicing, escaping...): defuse the
            # contents too and treat the whole rendering as template text.
            full = [dict(m, content=d.str(m["content"])) for m in base]
            pieces = [(template._render(full, add_generation_prompt, tools_d, extra_d), True)]
    else:
        pieces = [(rendered_s, True)]

    if max_bytes is not None:
        n = sum(len(p) for p, _ in pieces)
        if n > max_bytes:
            raise ValueError(f"the conversation rendered by the chat template ({_TEMPLATE_KEY}) is "
                             f"{n:,} characters, which cannot fit in n_ctx={n_ctx} tokens "
                             f"(at most {max_bytes:,} bytes)")

    # Split template text at control-token text; join the plain runs.
    out_parts = []  # str (plain text, to encode without special parsing) or int (token id)
    plain = []
    for text, is_template in pieces:
        if not is_template or rx is None:
            plain.append(text if not is_template else d.restore(text))
            continue
        pos = 0
        for m in rx.finditer(text):
            if m.start() > pos:
                plain.append(d.restore(text[pos:m.start()]))
            if plain:
                out_parts.append("".join(plain))
                plain = []
            out_parts.append(tokenizer.token_to_id(m.group(0)))
            pos = m.end()
        if pos < len(text):
            plain.append(d.restore(text[pos:]))
    if plain:
        out_parts.append("".join(plain))

    ids = []
    for p in out_parts:
        if isinstance(p, int):
            ids.append(p)
        elif p:
            ids.extend(tokenizer.encode(p, special=False, add_bos=False))
    if tokenizer.add_bos and tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
        ids.insert(0, tokenizer.bos_id)
    return ids
