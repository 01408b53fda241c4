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
