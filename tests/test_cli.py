"""The orcd command: generate and chat on the real model (subprocesses, as a user runs them)."""
import subprocess
import sys

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
