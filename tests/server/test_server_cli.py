"""The ``rocmforge`` client commands against a real server: generate, status, cancel, and
the exit code when no server answers."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
from httpx_sse import connect_sse
from live_server import LONG_MAX_TOKENS, cli_env, wait_for_status, wait_until_idle

CLI_TIMEOUT_S = 60


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rocmforge.cli", *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, env=cli_env())


def test_generate_prints_the_same_text_as_the_api(base_url: str, client: httpx.Client) -> None:
    expected = client.post("/generate", json={"prompt": "Hello", "max_tokens": 8, "temperature": 0}).json()["text"]
    streamed = run_cli("--host", base_url, "generate", "-p", "Hello", "-n", "8", "-t", "0")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == expected + "\n"
    whole = run_cli("--host", base_url, "generate", "-p", "Hello", "-n", "8", "-t", "0", "--no-stream")
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout == expected + "\n"


def test_generated_text_is_printed_verbatim(base_url: str, client: httpx.Client) -> None:
    """Control characters (here a backspace the tiny model happens to produce) reach stdout
    unchanged; a rich console would drop them, expand tabs and render ``:name:`` as emoji."""
    texts = {p: client.post("/generate", json={"prompt": p, "max_tokens": 8, "temperature": 0}).json()["text"]
             for p in ("def add(a, b):", "1, 2, 3", "Hello", "Once upon a time")}
    # The case worth testing: an answer holding a character a rich console would alter.
    prompt, expected = next(((p, t) for p, t in texts.items() if any(ch in t for ch in "\t\r\x07\x08\x0b\x0c")),
                            (None, None))
    assert prompt is not None, texts
    for flag in ("--stream", "--no-stream"):
        result = run_cli("--host", base_url, "generate", "-p", prompt, "-n", "8", "-t", "0", flag)
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected + "\n", flag


def test_generate_chat_through_the_server(base_url: str, client: httpx.Client) -> None:
    messages = [{"role": "user", "content": "Hello"}]
    expected = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0})
    content = expected.json()["choices"][0]["message"]["content"]
    for flag in ("--stream", "--no-stream"):
        result = run_cli("--host", base_url, "generate", "-p", "Hello", "-n", "6", "-t", "0", "--chat", flag)
        assert result.returncode == 0, result.stderr
        assert result.stdout == content + "\n", flag


def test_status_and_cancel(base_url: str, client: httpx.Client) -> None:
    client.post("/generate", json={"prompt": "Hello", "max_tokens": 3, "ignore_eos": True},
                headers={"X-Request-Id": "cli-finished"})
    status = run_cli("--host", base_url, "status", "cli-finished")
    assert status.returncode == 0, status.stderr
    body = json.loads(status.stdout)
    assert body["request_id"] == "cli-finished"
    assert body["state"] == "finished" and body["num_generated_tokens"] == 3

    # Cancel a running request from the command line; its stream ends "cancelled".
    long = {"prompt": "Hello", "max_tokens": LONG_MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    with connect_sse(client, "POST", "/generate/stream", json=long, headers={"X-Request-Id": "cli-running"}) as src:
        events = src.iter_sse()
        assert next(events).event == "delta"
        cancel = run_cli("--host", base_url, "cancel", "cli-running")
        assert cancel.returncode == 0, cancel.stderr
        assert json.loads(cancel.stdout)["cancelled"] is True
        rest = list(events)
    assert rest[-1].event == "done" and rest[-1].json()["finish_reason"] == "cancelled"
    status = wait_for_status(client, "cli-running", lambda b: b.get("state") == "finished")
    assert status["finish_reason"] == "cancelled"
    assert wait_until_idle(client)["rocmforge_requests_running"] == 0

    again = run_cli("--host", base_url, "cancel", "cli-running")  # idempotent
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["cancelled"] is False


def test_unknown_request_id_exits_4(base_url: str) -> None:
    for command in ("status", "cancel"):
        result = run_cli("--host", base_url, command, "no-such-request")
        assert result.returncode == 4, (command, result.stdout, result.stderr)
        assert "no-such-request" in result.stderr
        assert "Traceback" not in result.stderr


def test_request_ids_with_url_and_markup_characters(base_url: str, client: httpx.Client) -> None:
    client.post("/generate", json={"prompt": "Hello", "max_tokens": 2}, headers={"X-Request-Id": "cli/a?b#[red]"})
    found = run_cli("--host", base_url, "status", "cli/a?b#[red]")
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["request_id"] == "cli/a?b#[red]"
    # The server's message names the id; its brackets are printed, not read as rich markup.
    missing = run_cli("--host", base_url, "status", "[/bold]x[red]")
    assert missing.returncode == 4, missing.stderr
    assert missing.stderr.count("\n") == 1 and "[/bold]x[red]" in missing.stderr, missing.stderr


def test_unreachable_server_exits_3_with_one_line() -> None:
    for args in (["generate", "-p", "Hello", "-n", "8", "-t", "0"], ["status", "abc"], ["cancel", "abc"]):
        result = run_cli("--host", "http://127.0.0.1:1", *args)
        assert result.returncode == 3, (args, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("error:") and "127.0.0.1:1" in lines[0]
        assert result.stdout == ""


def test_generate_through_the_server_under_a_constraint(base_url: str) -> None:
    for flag in ("--stream", "--no-stream"):
        result = run_cli("--host", base_url, "generate", "-p", "Hello", "-n", "20", "-t", "0", "--regex",
                         "[a-c]{3}", flag)
        assert result.returncode == 0, result.stderr
        assert re.fullmatch("[a-c]{3}", result.stdout.rstrip("\n")), result.stdout
    chat = run_cli("--host", base_url, "generate", "-p", "Hello", "-n", "40", "-t", "0", "--chat", "--no-stream",
                   "--json-schema", '{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}')
    assert chat.returncode == 0, chat.stderr
    assert json.loads(chat.stdout) in ({"ok": True}, {"ok": False})
