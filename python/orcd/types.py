"""The typed values of orcd's Python API: SamplingParams (what steers a
generation; the one place its defaults live), Usage, Completion, and
CompletionStream (the iterator that stream() returns).

    p = SamplingParams(temperature=0, max_tokens=32)
    out = llm.generate("def fib(n):", params=p)        # Completion
    out.text, out.token_ids, out.finish_reason, out.usage.total_tokens
    s = llm.stream("def fib(n):", params=p)            # CompletionStream
    text = "".join(s); s.finish_reason, s.usage         # known once exhausted

Bounds: top_k is clamped to 2**31 - 1 (any value >= n_vocab keeps every token);
seed is used modulo 2**64; logprobs and prompt_logprobs in [0, MAX_LOGPROBS]. The
numeric ranges of the float parameters are checked by the native sampler
(cpp/sampler.cpp), which names the parameter.

Logprobs are log-probabilities under the model's raw distribution: log_softmax of the
logits before penalties, temperature, top_k / top_p / min_p and any token mask (vLLM's
default), computed in C++ (cpp/logprobs.h) or next to the logits on the GPU.
"""
from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Literal, Optional, Sequence, Tuple, Union

FinishReason = Literal["stop", "length"]

_INT32_MAX = 2**31 - 1
MAX_LOGPROBS = 20  # top tokens per position (OpenAI's chat limit; cpp/logprobs.h kMaxTopLogprobs)
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    """Everything that steers one generation.

    max_tokens          most tokens to generate (None: until n_ctx is full)
    temperature         0 = greedy (argmax); higher = more random
    top_k               keep the k most likely tokens (0 = off)
    top_p               keep the smallest set whose probability reaches top_p (1 = off)
    min_p               drop tokens below min_p x the top probability (0 = off)
    repetition_penalty  > 1 discourages tokens already seen (1 = off)
    presence_penalty    subtracted once from each seen token's logit, in [-2, 2]
    frequency_penalty   subtracted per occurrence, in [-2, 2]
    penalty_last_n      how many recent tokens the penalties look at (-1 = all)
    seed                random seed (None: a fresh random one per call)
    stop                a stop string or a list of them (not included in the text)
    stop_token_ids      token ids that end the generation (not included)
    ignore_eos          keep going past end-of-generation tokens
    logprobs            None, or N in [0, 20]: each generated token's log-probability and the
                        N most likely tokens' (Completion.logprobs); raw distribution, see above
    prompt_logprobs     None, or N in [0, 20]: the same for each prompt token after the first
                        (Completion.prompt_logprobs; the prompt is evaluated for every row)

    Validated when created and again when used (fields can be reassigned).
    """

    max_tokens: Optional[int] = 256
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: Optional[int] = None
    stop: Optional[Union[str, Sequence[str]]] = None
    stop_token_ids: Optional[Sequence[int]] = None
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> "SamplingParams":
        """Raises TypeError / ValueError naming the first bad field; returns self."""
        if self.max_tokens is not None:
            if not _is_int(self.max_tokens):
                raise TypeError(f"max_tokens must be an int or None (got {type(self.max_tokens).__name__})")
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be a positive integer or None (got {self.max_tokens!r})")
        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            if not isinstance(v, numbers.Real) or isinstance(v, bool):
                raise TypeError(f"{name} must be a number (got {type(v).__name__})")
            if v != v or v in (float("inf"), float("-inf")):
                raise ValueError(f"{name} must be a finite number (got {v!r})")
        if not _is_int(self.top_k):
            raise TypeError(f"top_k must be an int (got {type(self.top_k).__name__})")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off; got {self.top_k})")
        if not _is_int(self.penalty_last_n):
            raise TypeError(f"penalty_last_n must be an int (got {type(self.penalty_last_n).__name__})")
        if not -1 <= self.penalty_last_n <= _INT32_MAX:
            raise ValueError(f"penalty_last_n must be in [-1, 2**31 - 1] (-1 = all; got {self.penalty_last_n})")
        if self.seed is not None:
            if not _is_int(self.seed):
                raise TypeError(f"seed must be an int or None (got {type(self.seed).__name__})")
            if self.seed < 0:
                raise ValueError(f"seed must be a non-negative integer (got {self.seed!r})")
        self.stop_strings()
        if self.stop_token_ids is not None:
            if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(self.stop_token_ids, Sequence):
                raise TypeError("stop_token_ids must be a list of ints "
                                f"(got {type(self.stop_token_ids).__name__})")
            for t in self.stop_token_ids:
                if not _is_int(t):
                    raise TypeError(f"stop_token_ids must be a list of ints (got an item {t!r})")
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos must be a bool (got {type(self.ignore_eos).__name__})")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is None:
                continue
            if not _is_int(v):
                raise TypeError(f"{name} must be an int or None (got {type(v).__name__})")
            if not 0 <= v <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}] or None (got {v!r})")
        return self

    def stop_strings(self) -> List[str]:
        """`stop` as a list of non-empty strings."""
        if self.stop is None:
            return []
        if isinstance(self.stop, str):
            stops = [self.stop]
        elif isinstance(self.stop, Sequence) and not isinstance(self.stop, bytes):
            stops = list(self.stop)
        else:
            raise TypeError(f"stop must be a str or a list of str (got {type(self.stop).__name__})")
        for s in stops:
            if not isinstance(s, str):
                raise TypeError(f"stop strings must be str (got {type(s).__name__})")
            if not s:
                raise ValueError("stop strings must be non-empty")
        return stops

    def replace(self, **changes) -> "SamplingParams":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    def native_sampler(self):
        """The orcd._orcd.Sampler for these parameters (a fresh random seed when seed is None).
        Raises ValueError naming a parameter out of its range."""
        from . import _orcd

        self.validate()
        seed = self.seed
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        return _orcd.Sampler(
            temperature=float(self.temperature),
            top_k=min(int(self.top_k), _INT32_MAX),
            top_p=float(self.top_p),
            min_p=float(self.min_p),
            repetition_penalty=float(self.repetition_penalty),
            presence_penalty=float(self.presence_penalty),
            frequency_penalty=float(self.frequency_penalty),
            penalty_last_n=int(self.penalty_last_n),
            seed=int(seed) & 0xFFFFFFFFFFFFFFFF,
        )


SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


@dataclass(frozen=True)
class Usage:
    """Token counts of one call. usage["prompt_tokens"] works too."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    def __getitem__(self, key: str) -> int:
        if key not in ("prompt_tokens", "completion_tokens", "total_tokens"):
            raise KeyError(key)
        return getattr(self, key)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TokenLogprobs:
    """One position's log-probabilities: the token there, its logprob and the most likely
    tokens' [(token_id, logprob), ...], best first (SamplingParams.logprobs of them)."""

    token_id: int
    logprob: float
    top: List[Tuple[int, float]]

    @classmethod
    def from_native(cls, token_id: int, pair) -> "TokenLogprobs":
        """From the engine's (logprob, [(id, logprob), ...])."""
        return cls(int(token_id), float(pair[0]), [(int(t), float(v)) for t, v in pair[1]])


@dataclass
class Completion:
    """The result of generate() / chat().

    text             the generated text (stop strings and end tokens excluded)
    token_ids        the generated token ids
    finish_reason    "stop" (an end-of-generation token, stop string or stop id) or "length"
    usage            prompt, completion and total token counts
    logprobs         with SamplingParams.logprobs: one TokenLogprobs per token id, else None
    prompt_logprobs  with SamplingParams.prompt_logprobs: one per prompt token (None for the
                     first, which has no context), else None
    """

    text: str
    token_ids: List[int]
    finish_reason: FinishReason
    usage: Usage
    logprobs: Optional[List[TokenLogprobs]] = None
    prompt_logprobs: Optional[List[Optional[TokenLogprobs]]] = None


class CompletionStream(Iterator[str]):
    """What stream() / stream_chat() return: iterates the text pieces as they are
    generated. Once exhausted, finish_reason ("stop" / "length"), usage and text are set;
    token_ids grows as tokens arrive. close() stops the generation early."""

    def __init__(self, pieces: Iterator[tuple], prompt_tokens: int,
                 logprobs: Optional[List[TokenLogprobs]] = None,
                 prompt_logprobs: Optional[List[Optional[TokenLogprobs]]] = None):
        self._pieces = pieces
        self.logprobs = logprobs  # with SamplingParams.logprobs: grows with token_ids
        self.prompt_logprobs = prompt_logprobs
        self.token_ids: List[int] = []
        self.finish_reason: Optional[FinishReason] = None
        self.usage: Optional[Usage] = None
        self._parts: List[str] = []
        self._prompt_tokens = prompt_tokens
        self._done = False

    def __iter__(self) -> "CompletionStream":
        return self

    def __next__(self) -> str:
        while True:
            try:
                tok, piece, finish = next(self._pieces)
            except StopIteration:
                self._done = True
                raise
            if tok is not None:
                self.token_ids.append(tok)
            if finish is not None:
                self.finish_reason = finish
                n = len(self.token_ids)
                self.usage = Usage(self._prompt_tokens, n, self._prompt_tokens + n)
            if piece:
                self._parts.append(piece)
                return piece

    @property
    def text(self) -> str:
        """The text produced so far (all of it once exhausted)."""
        return "".join(self._parts)

    def close(self) -> None:
        """Stops the generation (frees its cache slot)."""
        self._pieces.close()

    def completion(self) -> Completion:
        """Runs the stream to its end and returns it as a Completion."""
        for _ in self:
            pass
        return Completion(self.text, list(self.token_ids), self.finish_reason, self.usage,
                          None if self.logprobs is None else list(self.logprobs), self.prompt_logprobs)
