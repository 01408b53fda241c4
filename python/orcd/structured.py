"""orcd.structured: constrained generation (structured output) with llguidance.

A request may constrain its output to a JSON schema, any JSON object, a regular
expression or a grammar (Lark, llguidance's native form, or GBNF as llama.cpp writes it):

    spec = structured_spec(tokenizer, n_vocab, response_format={"type": "json_schema",
                           "json_schema": {"name": "x", "schema": {...}}})
    c = spec.new_constraint()            # one per generation (a matcher with its own state)
    c(generated_ids, mask_words)         # fills the allowed-token bitmask for the next token
    logits = c.apply(logits, generated)  # the same, applied to host logits (Model's loop)

The matcher consumes the generated tokens lazily: each call first feeds it the tokens it has
not seen, then computes the mask of the next token (bit t % 32 of word t // 32 set: token t
allowed; (n_vocab + 31) // 32 uint32 words). The end-of-generation tokens are allowed exactly
when the grammar accepts the text so far; once nothing can follow, only they are.

The llguidance tokenizer is built once per orcd Tokenizer (a few seconds for a 150k
vocabulary) from the HF `tokenizers` object that orcd's Tokenizer builds from the GGUF vocab.

Bounds: llguidance's own parser limits (LLParserLimits defaults: grammar size, lexer fuel per
mask, Earley items per step) bound the work of a grammar per token; a grammar past them is
refused when compiled (ValueError) or ends its generation with an error. JSON whitespace
between tokens is at most MAX_JSON_WHITESPACE characters (a model at temperature 1 could
otherwise emit blank space until max_tokens).
"""
from __future__ import annotations

import json
import threading
import weakref
from typing import Optional

import numpy as np

MAX_JSON_WHITESPACE = 16
_JSON_OPTIONS = {"whitespace_pattern": r"[ \t\n\r]{0,%d}" % MAX_JSON_WHITESPACE}

_tok_lock = threading.Lock()
_tok_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ValueError("structured output (response_format, regex, grammar, tool_choice) needs the "
                         "llguidance package: pip install \"orcd[structured]\"") from None
    return llguidance


def ll_tokenizer(tokenizer, n_vocab: int):
    """The llguidance LLTokenizer of an orcd Tokenizer over n_vocab logits (cached)."""
    llg = _llguidance()
    with _tok_lock:
        per = _tok_cache.get(tokenizer)
        if per is None:
            per = _tok_cache[tokenizer] = {}
        lt = per.get(n_vocab)
        if lt is None:
            hf, eos = tokenizer._hf.to_str(), sorted(tokenizer.eos_ids)
            try:  # recent llguidance takes every end-of-generation id
                lt = llg.LLTokenizer(hf, n_vocab=int(n_vocab), eos_token=eos)
            except TypeError:  # older releases (1.6) take one: the EOS id, else the first EOG id
                one = tokenizer.eos_id if tokenizer.eos_id is not None else eos[0]
                lt = llg.LLTokenizer(hf, n_vocab=int(n_vocab), eos_token=int(one))
            per[n_vocab] = lt
        return lt


# ---------------------------------------------------------------- requests -> grammars
def json_schema_grammar(schema, field: str = "response_format") -> str:
    """The llguidance grammar of a JSON schema (dict or JSON text)."""
    llg = _llguidance()
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ValueError(f"{field}: the schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"{field}: the schema must be a JSON object (got {type(schema).__name__})")
    try:
        return llg.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{field}: {e}") from None


def response_format_grammar(response_format) -> Optional[str]:
    """OpenAI's response_format -> a grammar, or None for {"type": "text"} / None."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ValueError(f"response_format must be an object with a 'type' (got {type(response_format).__name__})")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar({"type": "object"})
    if kind == "json_schema":
        js = response_format.get("json_schema")
        if not isinstance(js, dict):
            raise ValueError("response_format.json_schema must be an object {name, schema, strict}")
        name = js.get("name")
        if name is not None and not isinstance(name, str):
            raise ValueError(f"response_format.json_schema.name must be a string (got {name!r})")
        schema = js.get("schema", {"type": "object"})
        return json_schema_grammar(schema, "response_format.json_schema.schema")
    raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema' (got {kind!r})")


def text_grammar(grammar: str) -> str:
    """A Lark grammar (llguidance's syntax) or a GBNF one (llama.cpp's) -> a grammar."""
    llg = _llguidance()
    if not isinstance(grammar, str) or not grammar.strip():
        raise ValueError("grammar must be a non-empty string (Lark or GBNF)")
    try:
        return llg.grammar_from("grammar", grammar)
    except (ValueError, TypeError) as e:
        raise ValueError(f"grammar: {e}") from None


def regex_grammar(regex: str) -> str:
    llg = _llguidance()
    if not isinstance(regex, str) or not regex:
        raise ValueError("regex must be a non-empty string")
    return llg.LLMatcher.grammar_from_regex(regex)


def request_grammar(response_format=None, regex=None, grammar=None) -> Optional[tuple]:
    """(field name, grammar) of a request's constraint, or None without one. At most one of
    response_format (other than text), regex and grammar may be given."""
    given = []
    g = response_format_grammar(response_format)
    if g is not None:
        given.append(("response_format", g))
    if regex is not None:
        given.append(("regex", regex_grammar(regex)))
    if grammar is not None:
        given.append(("grammar", text_grammar(grammar)))
    if len(given) > 1:
        raise ValueError(f"{given[0][0]} and {given[1][0]} cannot be combined: give one constraint")
    return given[0] if given else None


# ---------------------------------------------------------------- compiled specs, constraints
class StructuredSpec:
    """A checked grammar for one model's tokenizer; new_constraint() for each generation."""

    def __init__(self, grammar: str, tokenizer, n_vocab: int, field: str = "grammar"):
        llg = _llguidance()
        self.tokenizer = tokenizer
        self.n_vocab = int(n_vocab)
        self.field = field
        self._lt = ll_tokenizer(tokenizer, n_vocab)
        err = llg.LLMatcher.validate_grammar(grammar, self._lt)
        if err:
            raise ValueError(f"{field}: {err.strip()}")
        self.grammar = grammar

    def new_constraint(self) -> "Constraint":
        return Constraint(self)


class Constraint:
    """One generation's matcher. Call it as the step loop's mask function:
    c(generated int32[n], mask uint32[words]) fills mask for the token after `generated`."""

    def __init__(self, spec: StructuredSpec):
        llg = _llguidance()
        self.spec = spec
        self.words = (spec.n_vocab + 31) // 32
        self._m = llg.LLMatcher(spec._lt, spec.grammar)
        self._n = 0  # generated tokens consumed so far
        self._check()

    def _check(self) -> None:
        if self._m.is_error():
            raise ValueError(f"{self.spec.field}: {self._m.get_error().strip()}")

    def _consume(self, generated) -> None:
        n = len(generated)
        if n < self._n:
            raise ValueError(f"structured output: {n} generated tokens after {self._n} were seen")
        for t in generated[self._n:]:
            self._m.consume_token(int(t))
            self._n += 1
            self._check()

    def __call__(self, generated, mask: np.ndarray) -> None:
        self._consume(generated)
        if mask.dtype != np.uint32 or mask.shape != (self.words,) or not mask.flags.c_contiguous:
            raise ValueError(f"structured output: the mask must be uint32[{self.words}]")
        self._m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        self._check()

    def mask(self, generated) -> np.ndarray:
        """The allowed-token bitmask after `generated` (uint32[words])."""
        out = np.zeros(self.words, np.uint32)
        self(generated, out)
        return out

    def apply(self, logits: np.ndarray, generated) -> np.ndarray:
        """logits (float32[n_vocab], changed in place) with the disallowed tokens at -inf."""
        allowed = np.unpackbits(self.mask(generated).view(np.uint8), bitorder="little")[: logits.shape[-1]]
        logits[allowed == 0] = -np.inf
        return logits

    def is_accepting(self) -> bool:
        return self._m.is_accepting()


def structured_spec(tokenizer, n_vocab: int, response_format=None, regex=None, grammar=None
                    ) -> Optional[StructuredSpec]:
    """The StructuredSpec of a request's response_format / regex / grammar, or None."""
    g = request_grammar(response_format, regex, grammar)
    if g is None:
        return None
    return StructuredSpec(g[1], tokenizer, n_vocab, g[0])


def plan_request(tokenizer, n_vocab: int, response_format=None, regex=None, grammar=None, tools=None,
                 tool_choice=None) -> tuple:
    """(StructuredSpec or None, tool mode) of an OpenAI-style request: the tool mode is
    orcd.tools.check_tool_choice's ("none", "auto", "required", "function:<name>"); a
    required or named tool choice is a grammar too, which cannot be combined with another."""
    from .tools import check_tool_choice, check_tools, tool_call_grammar

    tools = check_tools(tools)
    mode = check_tool_choice(tool_choice, tools)
    g = request_grammar(response_format, regex, grammar)
    tg = tool_call_grammar(tools, mode, tokenizer) if tools else None
    if tg is not None:
        if g is not None:
            raise ValueError(f"{g[0]} cannot be combined with tool_choice {tool_choice!r}: give one constraint")
        g = ("tools", tg)
    if g is None:
        return None, mode
    return StructuredSpec(g[1], tokenizer, n_vocab, g[0]), mode
