"""The orcd command: generate and chat on the real model (subprocesses, as a user runs them)."""
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import orcd


def orcd_cmd(*args, stdin=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "orcd.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def test_generate_greedy_matches_api(real_model_path):
    p = orcd_cmd("generate", "def add(a, b):", "-m", real_model_path, "--device", "cpu", "--temperature", "0",
                 "--max-tokens", "16")
    assert p.returncode == 0, p.stderr
    with orcd.Model(real_model_path, device="cpu", n_ctx=256) as llm:
        want = llm.generate("def add(a, b):", max_tokens=16, temperature=0).text
    assert p.stdout == want + "\n"


def test_generate_chat_flag(real_model_path):
    p = orcd_cmd("generate", "What is 3+4? Reply with the number.", "--chat", "-m", real_model_path, "--device", "cpu",
                 "--temperature", "0", "--max-tokens", "10")
    assert p.returncode == 0, p.stderr
    assert "7" in p.stdout and "<|im_end|>" not in p.stdout


def test_generate_invalid_parameter_is_one_line_error(real_model_path):
    p = orcd_cmd("generate", "hi", "-m", real_model_path, "--device", "cpu", "--top-p", "1.5")
    assert p.returncode == 1
    assert p.stderr.strip().count("\n") == 0 and "top_p" in p.stderr


def test_generate_missing_model_file():
    p = orcd_cmd("generate", "hi", "-m", "/nonexistent/m.gguf", "--device", "cpu")
    assert p.returncode == 1 and "/nonexistent/m.gguf" in p.stderr


def test_chat_keeps_conversation(real_model_path):
    p = orcd_cmd("chat", "-m", real_model_path, "--device", "cpu", "--temperature", "0", "--max-tokens", "20",
                 stdin="My favourite fruit is mango. Reply OK.\nWhat is my favourite fruit?\n")
    assert p.returncode == 0, p.stderr
    lines = [l for l in p.stdout.splitlines() if l.strip()]
    assert len(lines) >= 2
    assert "mango" in p.stdout.split("\n", 1)[1].lower()


def _write_bad_tokenizer_file(path, **over):
    """A GGUF with one tensor and tokenizer metadata made bad by `over`."""
    import numpy as np
    from gguf import GGUFWriter
    from tiny_models import tiny_vocab

    tokens, types, merges = tiny_vocab(50)
    w = GGUFWriter(str(path), "qwen2")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    if "tokens" in over:
        w.add_array("tokenizer.ggml.tokens", over["tokens"])
    else:
        w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(over.get("merges", merges))
    if "eos" in over:
        w.add_key_value("tokenizer.ggml.eos_token_id", over["eos"][0], over["eos"][1])
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_bad_files_are_one_line_errors(tmp_path):
    """Bad tokenizer metadata: `orcd generate` and `orcd inspect --json` print one line
    `orcd: error: ...` and exit 1, never a traceback."""
    from gguf import GGUFValueType
    from tiny_models import tiny_vocab

    n = len(tiny_vocab(50)[0])
    files = {
        "tokens": _write_bad_tokenizer_file(tmp_path / "u32.gguf", tokens=list(range(n))),
        "merges": _write_bad_tokenizer_file(tmp_path / "merge.gguf", merges=tiny_vocab(50)[2] + ["zzq qqz"]),
        "eos_token_id": _write_bad_tokenizer_file(tmp_path / "eos.gguf", eos=(3.5, GGUFValueType.FLOAT32)),
        "eos_token_id ": _write_bad_tokenizer_file(tmp_path / "eosarr.gguf", eos=([1, 2], GGUFValueType.ARRAY)),
    }
    for field, path in files.items():
        p = orcd_cmd("generate", "hi", "-m", path, "--device", "cpu", timeout=120)
        assert p.returncode == 1, p.stderr
        assert p.stderr.startswith("orcd: error: ") and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.strip().count("\n") == 0 and field.strip() in p.stderr, p.stderr
        p = orcd_cmd("inspect", "--json", path, timeout=120)
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    import json
    d = json.loads(orcd_cmd("inspect", "--json", files["eos_token_id "]).stdout)
    assert d["tokenizer"]["eos_token_id"] == [1, 2]


def test_bad_arguments_are_one_line_errors(real_model_path):
    for args, field in ((("--top-k", "-5"), "top_k"), (("--threads", "-3"), "n_threads")):
        p = orcd_cmd("generate", "hi", "-m", real_model_path, "--device", "cpu", *args, timeout=120)
        assert p.returncode == 1 and field in p.stderr and "Traceback" not in p.stderr, p.stderr


# ---------------------------------------------------------------- `python -m orcd`, help, messages
def orcd_main(*args, stdin=None, env=None, timeout=300):
    import os

    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "orcd", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=e)


def test_python_m_orcd_and_version():
    p = orcd_main("--version")
    assert p.returncode == 0 and p.stdout == f"orcd {orcd.__version__}\n", (p.stdout, p.stderr)


def test_no_command_prints_usage_and_exits_2():
    p = orcd_main()
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("usage: orcd")
    assert "a command is needed" in p.stderr and "generate" in p.stderr and "serve" in p.stderr
    # no parser internals (argparse's "required: cmd"), no traceback
    assert "cmd" not in p.stderr.replace("command", "") and "Traceback" not in p.stderr


def _options(parser):
    import argparse

    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from ((f"{name} {o}", x) for o, x in _options(sp))
        elif a.option_strings:
            yield a.option_strings[-1], a


def test_every_option_has_help_text():
    import argparse

    from orcd.cli import build_parser

    opts = list(_options(build_parser()))
    assert len(opts) > 40
    missing = [name for name, a in opts if not a.help or (a.help == argparse.SUPPRESS and "load-delay" not in name)]
    assert not missing, missing


def test_help_shows_defaults():
    import re

    d = orcd.SamplingParams()
    p = orcd_main("generate", "--help")
    assert p.returncode == 0, p.stderr
    text = re.sub(r"\s+", " ", p.stdout)
    for opt, value in (("--max-tokens MAX_TOKENS", d.max_tokens), ("--temperature TEMPERATURE", d.temperature),
                       ("--top-k TOP_K", d.top_k), ("--n-ctx N_CTX", 4096), ("--threads THREADS", 0),
                       ("--presence-penalty PRESENCE_PENALTY", d.presence_penalty)):
        m = re.search(re.escape(opt) + r" (.*?)(?= --|$)", text)
        assert m and f"(default: {value})" in m.group(1), (opt, m and m.group(1))
    p = orcd_main("serve", "--help")
    assert p.returncode == 0 and "(default: 8000)" in p.stdout and "load-delay" not in p.stdout


def test_generate_reads_the_prompt_from_stdin(real_model_path):
    p = orcd_main("generate", "-", "-m", real_model_path, "--device", "cpu", "--temperature", "0",
                  "--max-tokens", "12", stdin="def add(a, b):")
    assert p.returncode == 0, p.stderr
    with orcd.Model(real_model_path, device="cpu", n_ctx=256) as llm:
        assert p.stdout == llm.generate("def add(a, b):", max_tokens=12, temperature=0).text + "\n"
    p = orcd_main("generate", "-", "-m", real_model_path, "--device", "cpu", stdin="  \n")
    assert p.returncode == 1 and "stdin" in p.stderr and "empty" in p.stderr


def test_device_cuda_on_a_cpu_only_build_says_how_to_rebuild(real_model_path):
    import pytest

    if "built without" not in orcd.cuda_status():
        pytest.skip(f"not a CPU-only build: {orcd.cuda_status() or 'CUDA available'}")
    p = orcd_main("generate", "hi", "-m", real_model_path, "--device", "cuda")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert "built without the CUDA backend" in p.stderr and "ORCD_CUDA=ON pip install" in p.stderr


def test_unknown_model_name_lists_the_known_names():
    from orcd.default_model import MODELS

    p = orcd_main("generate", "hi", "-m", "qwen-nonesuch", "--device", "cpu")
    assert p.returncode == 1 and "unknown model 'qwen-nonesuch'" in p.stderr
    assert all(name in p.stderr for name in MODELS)
    p = orcd_main("bench", "-m", "qwen-nonesuch", "--device", "cpu")
    assert p.returncode == 1 and "unknown model 'qwen-nonesuch'" in p.stderr


def test_missing_other_model_is_not_called_the_default_model(tmp_path):
    import pytest

    from orcd import default_model as dm

    name = "qwen2.5-coder-1.5b-instruct-q4_k_m"
    assert name != dm.DEFAULT_MODEL
    if dm.installed_parts(name) is not None:
        pytest.skip("the 1.5B model's packages are installed here")
    p = orcd_main("generate", "hi", "-m", name, "--device", "cpu", env={"ORCD_CACHE": str(tmp_path)})
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "default model" not in p.stderr
    assert f"the model {name}" in p.stderr and 'pip install "orcd[qwen-1.5b]"' in p.stderr


# ---------------------------------------------------------------- -m everywhere, bench progress, chat
def test_inspect_takes_a_path_or_dash_m_or_a_name(real_model_path):
    import json

    from orcd.default_model import DEFAULT_MODEL, cached_model_path

    by_path = json.loads(orcd_main("inspect", real_model_path, "--json").stdout)
    p = orcd_main("inspect", "-m", real_model_path, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == by_path
    if real_model_path == cached_model_path():  # the name resolves to this very file
        p = orcd_main("inspect", "--model", DEFAULT_MODEL, "--json")
        assert p.returncode == 0 and json.loads(p.stdout) == by_path, p.stderr
    p = orcd_main("inspect", real_model_path, "-m", "/elsewhere/other.gguf")
    assert p.returncode == 1 and "two models given" in p.stderr and p.stderr.count("\n") == 1
    p = orcd_main("inspect", "-m", "qwen-nonesuch")
    assert p.returncode == 1 and "unknown model 'qwen-nonesuch'" in p.stderr


def test_verify_takes_a_positional_model_or_dash_m():
    from orcd.cli import _model_from_args, build_parser

    parse = build_parser().parse_args
    assert _model_from_args(parse(["verify", "a.gguf"]), "model_pos") == "a.gguf"
    assert _model_from_args(parse(["verify", "-m", "b.gguf"]), "model_pos") == "b.gguf"
    assert _model_from_args(parse(["verify", "--model", "c", "c"]), "model_pos") == "c"
    assert _model_from_args(parse(["verify"]), "model_pos") is None
    import pytest

    with pytest.raises(ValueError, match="two models given"):
        _model_from_args(parse(["verify", "a.gguf", "-m", "b.gguf"]), "model_pos")
    for cmd in ("generate", "chat", "bench", "inspect", "verify", "serve"):
        assert "-m MODEL, --model MODEL" in orcd_main(cmd, "--help").stdout, cmd


def test_bench_shows_progress_and_records_the_real_thread_count(real_model_path):
    import json
    import os

    for threads, want in ((0, len(os.sched_getaffinity(0))), (3, 3)):
        p = orcd_main("bench", "-m", real_model_path, "--device", "cpu", "-p", "8", "-n", "2", "--repeat", "2",
                      "--threads", str(threads), "--json")
        assert p.returncode == 0, p.stderr
        d = json.loads(p.stdout)
        assert d["threads"] == want and d["threads_requested"] == threads
        steps = [l for l in p.stderr.splitlines() if l.startswith("orcd bench: ")]
        for phase in ("loaded", "warm-up: pp8", "run 1/2: pp8", "run 2/2: tg2@pp8", "run 2/2: tg2",
                      "warm load 2/2"):
            assert any(phase in l for l in steps), (phase, p.stderr)


def test_bench_and_chat_device_cuda_on_a_cpu_only_build_say_how_to_rebuild():
    import pytest

    if "built without" not in orcd.cuda_status():
        pytest.skip(f"not a CPU-only build: {orcd.cuda_status() or 'CUDA available'}")
    for args in (("bench", "--device", "cuda", "-m", "qwen-nonesuch"), ("chat", "--device", "cuda"),
                 ("generate", "hi", "--device", "cuda")):
        p = orcd_main(*args, stdin="")
        assert p.returncode == 1 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, (args, p.stderr)
        assert "built without the CUDA backend" in p.stderr and "ORCD_CUDA=ON pip install" in p.stderr, args


def test_chat_banner_and_cut_marker_on_stderr(real_model_path):
    p = orcd_cmd("chat", "-m", real_model_path, "--device", "cpu", "--temperature", "0", "--max-tokens", "4",
                 "--system", "You are terse.", stdin="Write a long poem about rivers.\n/reset\n")
    assert p.returncode == 0, p.stderr
    err = p.stderr.splitlines()
    assert err[0].startswith("orcd chat: Qwen2.5 Coder 0.5B Instruct") and "Q4_K_M" in err[0] and "on cpu" in err[0]
    assert "[cut at max_tokens=4]" in err and "[conversation cleared, system prompt kept]" in err
    assert "[cut" not in p.stdout and p.stdout.strip(), "stdout holds the answer only"


def test_verify_long_prompt_ids_are_deterministic_and_exact(tmp_path):
    """`orcd verify --prompt-tokens N`: exactly N ids of orcd's own sources, the same on every
    call (repeated past the sources' length), ids the tokenizer decodes back to that text."""
    from orcd.verify import long_prompt_ids

    class Chars:  # a stand-in tokenizer: one id per character
        def encode(self, text, special=False):
            return [ord(c) for c in text]

    a = long_prompt_ids(Chars(), 1000)
    b = long_prompt_ids(Chars(), 1000)
    assert len(a) == 1000 and a.dtype == np.int32 and (a == b).all()
    big = long_prompt_ids(Chars(), 3_000_000)  # beyond the sources: they repeat
    assert len(big) == 3_000_000 and (big[:1000] == a).all()
    src = "".join(f.read_text(encoding="utf-8") for f in sorted(pathlib.Path(orcd.__file__).parent.glob("*.py")))
    assert "".join(map(chr, a)) == src[:1000]
    assert "".join(map(chr, big[len(src):len(src) + 50])) == src[:50]
    with pytest.raises(ValueError, match="prompt-tokens"):
        long_prompt_ids(Chars(), 0)


def test_verify_rejects_negative_prompt_tokens(capsys):
    from orcd.cli import main

    assert main(["verify", "--prompt-tokens", "-5", "x.gguf"]) == 1
    assert "--prompt-tokens must be >= 0" in capsys.readouterr().err
