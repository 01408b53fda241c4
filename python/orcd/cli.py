"""The `orcd` command: inspect, generate, chat, verify, bench, serve, bench-serve."""
from __future__ import annotations

import argparse
import os
import sys


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after each option's help, except for defaults that say
    nothing (None, False) or help that names its default already."""

    def _get_help_string(self, action):
        h = action.help or ""
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in h:
            return h
        return super()._get_help_string(action)


def _add_model_arg(p, required=False):
    from .default_model import DEFAULT_MODEL, MODELS

    p.add_argument("-m", "--model", default=None,
                   help=f"a GGUF file or a known model name ({', '.join(MODELS)}); "
                        f"default: the default model, {DEFAULT_MODEL}")


def _add_sampling_args(p):
    from .types import SamplingParams as D  # the defaults live there

    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=D.max_tokens, help="most tokens to generate")
    g.add_argument("--temperature", type=float, default=D.temperature, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=D.top_k, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=D.top_p,
                   help="keep the smallest set of tokens whose probability reaches top-p (1 = off)")
    g.add_argument("--min-p", type=float, default=D.min_p,
                   help="drop tokens below min-p x the top probability (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=D.repetition_penalty,
                   help="> 1 discourages tokens already seen (1 = off)")
    g.add_argument("--presence-penalty", type=float, default=D.presence_penalty,
                   help="subtracted once from each seen token's logit, in [-2, 2]")
    g.add_argument("--frequency-penalty", type=float, default=D.frequency_penalty,
                   help="subtracted per occurrence of a seen token, in [-2, 2]")
    g.add_argument("--penalty-last-n", type=int, default=D.penalty_last_n,
                   help="recent tokens the penalties look at (-1 = all)")
    g.add_argument("--seed", type=int, default=D.seed, help="random seed (default: a fresh one per run)")
    g.add_argument("--stop", action="append", default=D.stop, help="stop string (repeatable)")


def _sampling_params(a):
    from .types import SamplingParams

    return SamplingParams(
        max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
        repetition_penalty=a.repetition_penalty, presence_penalty=a.presence_penalty,
        frequency_penalty=a.frequency_penalty, penalty_last_n=a.penalty_last_n, seed=a.seed, stop=a.stop,
    )


def _check_device(a) -> None:
    """--device cuda where CUDA cannot run: say why (and how to rebuild) before loading anything."""
    from .backend import cuda_available, cuda_status

    if a.device == "cuda" and not cuda_available():
        raise RuntimeError(f"--device cuda: CUDA is not available: {cuda_status()}")


def _load(a):
    from .model import Model

    _check_device(a)
    return Model(a.model, device=a.device, n_ctx=a.n_ctx, n_threads=getattr(a, "threads", 0),
                 verbose=getattr(a, "verbose", False))


def _model_from_args(a, positional: str = "path"):
    """The model of a command that takes it positionally or as -m/--model (not both)."""
    pos = getattr(a, positional, None)
    if pos is not None and a.model is not None and pos != a.model:
        raise ValueError(f"two models given: {pos!r} and -m {a.model!r}; give one")
    return pos if pos is not None else a.model


def cmd_inspect(a) -> int:
    from .default_model import resolve_model
    from .inspect_cmd import run

    print(run(resolve_model(_model_from_args(a)), as_json=a.json))
    return 0


def cmd_generate(a) -> int:
    params = _sampling_params(a)
    if a.prompt == "-":
        a.prompt = sys.stdin.read()
        if not a.prompt.strip():
            raise ValueError("generate -: the prompt read from stdin is empty")
    llm = _load(a)
    if a.chat:
        it = llm.stream_chat([{"role": "user", "content": a.prompt}], params)
    else:
        it = llm.stream(a.prompt, params)
    for piece in it:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(a) -> int:
    from .chat_cli import run_cli

    params = _sampling_params(a)
    llm = _load(a)
    return run_cli(llm, params, system=a.system)


def cmd_verify(a) -> int:
    from .verify import run

    if a.prompt_tokens < 0:
        raise ValueError(f"--prompt-tokens must be >= 0, got {a.prompt_tokens}")
    a.model = _model_from_args(a, "model_pos")
    return run(a)


def cmd_bench(a) -> int:
    from .default_model import resolve_model

    _check_device(a)
    a.model = resolve_model(a.model)  # a path, a known model name or None, as for generate
    if a.batch:
        from .bench_batch import run as run_batch

        return run_batch(a)
    from .bench import run

    if a.n_prompt is None:
        a.n_prompt = 512
    return run(a)


def cmd_serve(a) -> int:
    try:
        from .server import run
    except ImportError as e:
        raise RuntimeError(f"orcd serve needs the server extra: pip install \"orcd[server]\" ({e})") from None
    return run(model=a.model, host=a.host, port=a.port, device=a.device, max_seqs=a.max_seqs, n_ctx=a.n_ctx,
               max_queue=a.max_queue, api_key=a.api_key or os.environ.get("ORCD_API_KEY") or None,
               grace=a.grace, n_threads=a.threads, prefill_chunk=a.prefill_chunk, load_delay=a.load_delay,
               kv_memory=a.kv_memory)


def cmd_bench_serve(a) -> int:
    from .bench_serve import run

    return run(a)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    F = _HelpFormatter
    p = argparse.ArgumentParser(prog="orcd", description="Run GGUF language models on NVIDIA GPUs or the CPU",
                                formatter_class=F)
    p.add_argument("--version", action="version", version=f"orcd {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", title="commands")

    s = sub.add_parser("inspect", help="show a GGUF file's metadata and tensors", formatter_class=F)
    s.add_argument("path", nargs="?", default=None, help="the GGUF file or a known model name (as -m)")
    _add_model_arg(s)
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s.set_defaults(fn=cmd_inspect)

    for name, fn, hlp in (("generate", cmd_generate, "complete a prompt, streaming"),
                          ("chat", cmd_chat, "interactive conversation")):
        s = sub.add_parser(name, help=hlp, formatter_class=F)
        if name == "generate":
            s.add_argument("prompt", help="the prompt text ('-': read it from stdin)")
            s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
        else:
            s.add_argument("--system", default=None,
                           help="system message (default: the chat template's own, if it has one)")
        _add_model_arg(s)
        s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="auto: CUDA when available, else the CPU")
        s.add_argument("--n-ctx", type=int, default=4096, help="positions of KV cache (prompt + generated)")
        s.add_argument("--threads", type=int, default=0, help="CPU engine threads (0: one per core)")
        s.add_argument("-v", "--verbose", action="store_true", help="report loading on stderr")
        _add_sampling_args(s)
        s.set_defaults(fn=fn)

    s = sub.add_parser("verify", help="run CPU and GPU side by side and compare every layer", formatter_class=F)
    s.add_argument("model_pos", nargs="?", default=None, metavar="MODEL",
                   help="a GGUF file or a known model name (as -m)")
    _add_model_arg(s)
    s.add_argument("--prompt", action="append", default=None, help="a prompt to run (repeatable)")
    s.add_argument("--prompt-tokens", type=int, default=0, metavar="N",
                   help="also a long prompt of exactly N tokens (orcd's own sources), e.g. 16384")
    s.add_argument("--tolerance", type=float, default=0.999, help="minimum cosine per layer")
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("bench", help="measure load, prompt and decode speed", formatter_class=F)
    _add_model_arg(s)
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when available, else the CPU")
    s.add_argument("-p", "--n-prompt", type=int, default=None,
                   help="prompt tokens (default 512; 128 per sequence with --batch)")
    s.add_argument("-n", "--n-gen", type=int, default=128, help="tokens generated")
    s.add_argument("--batch", default=None, metavar="B,B,...",
                   help="many sequences at once (e.g. 1,8,32,64,128), llama-batched-bench's conventions, "
                        "sampled unless --greedy, plus Model.chat sampled (python/orcd/bench_batch.py)")
    s.add_argument("--greedy", action="store_true", help="with --batch: greedy instead of sampled")
    s.add_argument("--repeat", type=int, default=5, help="runs of each measurement")
    s.add_argument("--threads", type=int, default=0, help="CPU engine threads (0: one per core)")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("serve", help="serve the model over HTTP (OpenAI API, worker API, /health, /metrics)",
                       formatter_class=F)
    _add_model_arg(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when available, else the CPU")
    s.add_argument("--max-seqs", type=int, default=64, help="sequences generated at once (KV cache slots)")
    s.add_argument("--kv-memory", default=None, metavar="SIZE",
                   help="KV memory the sequences share, e.g. 2GiB (default: every sequence's --n-ctx, on the GPU "
                        "as far as 90%% of its free memory allows); a request reserves prompt + max_tokens"
                        " positions when it starts and waits while they are not free")
    s.add_argument("--n-ctx", type=int, default=4096, help="positions per sequence (prompt + generated)")
    s.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot; more get 429")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (also $ORCD_API_KEY)")
    s.add_argument("--grace", type=float, default=10.0,
                   help="seconds running requests may finish after SIGTERM / Ctrl-C")
    s.add_argument("--threads", type=int, default=0, help="CPU engine threads (0: one per core)")
    s.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens evaluated per step")
    s.add_argument("--load-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: see "loading"
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("bench-serve", help="load-test an OpenAI-compatible server with concurrent streams",
                       formatter_class=F)
    s.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    s.add_argument("--clients", type=int, default=1, help="concurrent streaming clients")
    s.add_argument("--requests", type=int, default=3, help="requests each client sends, one after another")
    s.add_argument("--warmup", type=int, default=1,
                   help="short requests (16 tokens) each client sends first, not measured")
    s.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request (ignore_eos)")
    s.add_argument("--prompt-words", type=int, default=100, help="words in each prompt")
    s.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the requests")
    s.add_argument("--top-k", type=int, default=40, help="top_k sent with each request (0: off)")
    s.add_argument("--top-p", type=float, default=0.95, help="top_p sent with each request (1: off)")
    s.add_argument("--min-p", type=float, default=0.05, help="min_p sent with each request (0: off)")
    s.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    s.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s.set_defaults(fn=cmd_bench_serve)
    p.commands = list(sub.choices)  # for the message when none is given
    return p


def main(argv=None) -> int:
    """The `orcd` command. Errors print one line `orcd: error: ...` and return 1
    (2 for bad command-line arguments, from argparse); set ORCD_DEBUG=1 for a traceback."""
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.cmd is None:
        parser.print_usage(sys.stderr)
        names = ", ".join(parser.commands)
        print(f"orcd: error: a command is needed: one of {names} (orcd --help says more)", file=sys.stderr)
        return 2
    try:
        return a.fn(a)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # noqa: BLE001 - a command-line tool reports, it does not dump a traceback
        if os.environ.get("ORCD_DEBUG"):
            raise
        msg = str(e) if isinstance(e, (ValueError, OSError, RuntimeError, KeyError)) else \
            f"{type(e).__name__}: {e}"
        print(f"orcd: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
