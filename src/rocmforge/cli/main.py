"""The ``rocmforge`` command line.

The only place (with the server's startup) that prints: everything below it logs. Errors are
one friendly line on stderr and a documented exit code; ``--debug`` adds the traceback.

Exit codes: 0 success; 1 runtime error (model, device, engine); 2 usage error (bad flag or
value, an invalid ``ROCMFORGE_*`` setting: every command validates the settings first and
names the bad variable or flag); 3 server unreachable; 4 not found (model file, request id).

With ``ROCMFORGE_LOG_FORMAT=json`` the lines the CLI writes to stderr on purpose (the
``serving ...`` notice, an error) are JSON log records too, so every stderr line parses.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.console import Console
from rich.table import Table

from rocmforge import __version__
from rocmforge.cli.config_options import with_config_options
from rocmforge.config import ENGINE_PARTS, ServerConfig
from rocmforge.errors import ConfigError, InvalidGrammarError, ModelNotFoundError, RequestNotFoundError, RocmForgeError
from rocmforge.logs import JsonFormatter, setup_logging
from rocmforge.settings import SettingsBase, load_settings
from rocmforge.structured import StructuredOutput

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_NOT_FOUND = 0, 1, 2, 3, 4

app = typer.Typer(
    name="rocmforge",
    help="Run GGUF language models on AMD ROCm, NVIDIA CUDA or the CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
out = Console()
err = Console(stderr=True)


class _State:
    debug = False
    host: str | None = None
    api_key: str | None = None
    json_logs = False
    """``ROCMFORGE_LOG_FORMAT=json``: the CLI's own stderr lines are JSON records too."""


def _version(value: bool) -> None:
    if value:
        out.print(f"rocmforge {__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    host: Annotated[
        str | None, typer.Option("--host", help="Server URL for client commands [env: ROCMFORGE_HOST].")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="Bearer key for the server [env: ROCMFORGE_API_KEY].")
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _State.debug = debug
    _State.host = host
    _State.api_key = api_key
    settings = load_settings()  # every command validates the whole configuration first
    _State.json_logs = settings.log_format == "json"
    setup_logging(
        "debug" if debug else settings.log_level,
        settings.log_format,
        settings.log_file,
        color=False if settings.no_color else None,
        max_file_bytes=settings.log_file_max_bytes,
        backup_count=settings.log_file_backups,
    )


@app.command()
def pull(
    name: Annotated[str, typer.Argument(help="Known model to fetch (smollm2).")] = "smollm2",
    force: Annotated[bool, typer.Option("--force", help="Download again even if present.")] = False,
) -> None:
    """Fetch a known model into the models directory (ROCMFORGE_MODELS) and verify it."""
    from rocmforge.hub import pull as pull_model

    settings = load_settings()
    with err.status(f"fetching {name} ..."):
        path = pull_model(name, settings.models, force=force)
    out.print(str(path))


@app.command()
def models() -> None:
    """List the GGUF files under the models directory (ROCMFORGE_MODELS)."""
    from rocmforge.hub import list_models

    settings = load_settings()
    found = list_models(settings.models)
    if not found:
        err.print(f"no GGUF files under {settings.models} (try `rocmforge pull smollm2`)")
        return
    table = Table("model", "size", "path")
    for path in found:
        table.add_row(path.stem, _size(path.stat().st_size), str(path))
    out.print(table)


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(help="GGUF file to describe.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the full summary as JSON.")] = False,
) -> None:
    """Describe a GGUF file: architecture, hyper-parameters, tensors, quantization, memory."""
    from rocmforge.gguf import read_gguf
    from rocmforge.gguf.summary import summarize

    with read_gguf(file) as gguf:
        summary = summarize(gguf)
    if as_json:
        out.print_json(json.dumps(summary))
        return
    _print_summary(summary)


@app.command()
@with_config_options(*ENGINE_PARTS.values())
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to complete.")],
    gguf: Annotated[
        str | None, typer.Option("--gguf", help="Run locally on this GGUF file or known model name.")
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 is greedy.")] = 0.7,
    top_k: Annotated[int, typer.Option("--top-k", help="Keep the k most likely tokens (0: off).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (1: off).")] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for reproducible sampling.")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print tokens as they are generated.")] = True,
    json_schema: Annotated[str | None, typer.Option("--json-schema", help="Constrain the output to JSON valid "
                                                    "against this schema (JSON text).")] = None,
    json_schema_file: Annotated[Path | None, typer.Option("--json-schema-file", help="The same, from a file.",
                                                          dir_okay=False)] = None,
    regex: Annotated[str | None, typer.Option("--regex", help="Constrain the output to match this regex.")] = None,
    grammar_file: Annotated[Path | None, typer.Option("--grammar-file", help="Constrain the output to this Lark or "
                                                      "GBNF grammar.", dir_okay=False)] = None,
    *,
    config: dict[str, Any],
) -> None:
    """Generate text: through the server (--host), or locally when --gguf names a model (the
    engine options apply to local runs)."""
    from rocmforge.sampling_params import SamplingParams

    structured = _structured_output(json_schema, json_schema_file, regex, grammar_file)
    if gguf is None:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "top_k": top_k,
                "top_p": top_p, "seed": seed, **_structured_fields(structured)}
        _generate_remote(body, chat=chat, stream=stream)
        return
    settings = load_settings(gguf=gguf, **config)
    llm = _load(settings)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                            structured=structured)
    if chat:
        prompt = llm.apply_chat_template([{"role": "user", "content": prompt}])
    if stream:
        for output in llm.stream(prompt, params):
            _emit(output.delta_text)
        _emit("\n")
        return
    [completion] = llm.generate(prompt, params)
    _emit(completion.text + "\n")


@app.command()
@with_config_options(*ENGINE_PARTS.values(), ServerConfig)
def serve(
    gguf: Annotated[str | None, typer.Option("--gguf", help="GGUF file or known model name [env: ROCMFORGE_GGUF].")] = None,
    addr: Annotated[str | None, typer.Option("--addr", help="HOST:PORT to bind [env: ROCMFORGE_ADDR; default 127.0.0.1:8080].")] = None,
    *,
    config: dict[str, Any],
) -> None:
    """Serve a model over HTTP (native and OpenAI-compatible APIs).

    SIGTERM/SIGINT drain: admission closes at once (/ready answers 503), in-flight requests
    get the shutdown timeout to finish, the rest are cancelled, and the process exits 0. A
    second signal cancels everything at once."""
    from rocmforge.server.serve import Address, build_state
    from rocmforge.server.serve import serve as run_server

    if "api_key" not in config and _State.api_key:
        config["api_key"] = _State.api_key
    settings = load_settings(gguf=gguf, addr=addr, **config)
    address = Address.parse(settings.addr)
    state = _with_progress(lambda progress: build_state(settings, progress))
    where = state.device if state.device_fallback is None else f"{state.device} (GPU fallback: {state.device_fallback})"
    _notice(f"serving {state.model_name} on http://{address.host}:{address.port}, device {where}")
    run_server(state, address)
    logging.shutdown()  # flush every handler (the log file included) before exiting
    sys.exit(EXIT_OK)


@app.command()
def status(request_id: Annotated[str, typer.Argument(help="Request id.")]) -> None:
    """Show a request's state on the server."""
    out.print_json(json.dumps(_http("GET", f"/status/{quote(request_id, safe='')}")))


@app.command()
def cancel(request_id: Annotated[str, typer.Argument(help="Request id.")]) -> None:
    """Cancel a request on the server (idempotent)."""
    out.print_json(json.dumps(_http("POST", f"/cancel/{quote(request_id, safe='')}")))


def _client() -> Any:
    import httpx

    settings = load_settings()
    key = _State.api_key or settings.server_config().api_key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=_State.host or settings.host, headers=headers, timeout=httpx.Timeout(600, connect=5))


def _http(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    import httpx

    try:
        with _client() as client:
            response = client.request(method, path, json=body)
    except httpx.TransportError as exc:
        raise ServerUnreachable(f"cannot reach the server at {_State.host or load_settings().host}: {exc}") from exc
    return _checked(response)


def _checked(response: Any) -> Any:
    try:
        payload = response.json()
    except ValueError:
        payload = {}
    if response.status_code >= 400:
        error = payload.get("error", {}) if isinstance(payload, dict) else {}
        message = error.get("message") or response.text or response.reason_phrase
        if response.status_code == 404:
            raise RequestNotFoundError(message)
        raise RemoteError(f"server answered {response.status_code}: {message}")
    return payload


def _structured_output(json_schema: str | None, json_schema_file: Path | None, regex: str | None,
                       grammar_file: Path | None) -> StructuredOutput | None:
    """The constraint the ``generate`` flags ask for (at most one), or None."""
    given = {flag: value for flag, value in (("--json-schema", json_schema), ("--json-schema-file", json_schema_file),
                                             ("--regex", regex), ("--grammar-file", grammar_file)) if value is not None}
    if len(given) > 1:
        raise typer.BadParameter(f"{' and '.join(given)}: give one constraint")
    try:
        if json_schema is not None:
            return StructuredOutput(json=json_schema)
        if json_schema_file is not None:
            return StructuredOutput(json=_read_text(json_schema_file, "--json-schema-file"))
        if regex is not None:
            return StructuredOutput(regex=regex)
        if grammar_file is not None:
            return StructuredOutput(grammar=_read_text(grammar_file, "--grammar-file"))
    except InvalidGrammarError as exc:
        raise typer.BadParameter(exc.message, param_hint="/".join(given)) from None
    return None


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc}", param_hint=flag) from None


def _structured_fields(structured: StructuredOutput | None) -> dict[str, Any]:
    """The request-body fields of a constraint (the native and chat routes take the same)."""
    if structured is None:
        return {}
    if structured.json is not None:
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": "cli", "schema": json.loads(structured.json)}}}
    return {structured.kind: structured.source}


def _generate_remote(body: dict[str, Any], *, chat: bool, stream: bool) -> None:
    """Generate through the server: native /generate(/stream), or the chat endpoint."""
    import httpx

    if chat:
        prompt = body.pop("prompt")
        body = {**body, "messages": [{"role": "user", "content": prompt}], "stream": stream}
    try:
        with _client() as client:
            if not stream:
                result = _checked(client.post("/v1/chat/completions" if chat else "/generate", json=body))
                text = result["choices"][0]["message"]["content"] if chat else result["text"]
                _emit(text + "\n")
                return
            path = "/v1/chat/completions" if chat else "/generate/stream"
            with client.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    _checked(response)
                for delta in _sse_deltas(response.iter_lines(), chat=chat):
                    _emit(delta)
                _emit("\n")
    except httpx.TransportError as exc:
        raise ServerUnreachable(f"cannot reach the server at {_State.host or load_settings().host}: {exc}") from exc


def _emit(text: str) -> None:
    """Generated text goes to stdout verbatim: rich would expand tabs, drop control
    characters and turn ``:name:`` into emoji."""
    sys.stdout.write(text)
    sys.stdout.flush()


def _sse_deltas(lines: Any, *, chat: bool) -> Any:
    """Text deltas from a native (``event: delta``) or OpenAI chat (``data: chunk``) stream."""
    event = None
    for line in lines:
        if line.startswith("event:"):
            event = line[6:].strip()
            continue
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        data = json.loads(payload)
        if "error" in data:
            raise RemoteError(data["error"]["message"])
        if chat:
            for choice in data.get("choices", []):
                yield choice.get("delta", {}).get("content") or ""
        elif event == "delta":
            yield data["delta"]


class ServerUnreachable(RocmForgeError):
    code = "server_unreachable"


class RemoteError(RocmForgeError):
    code = "remote_error"


def _with_progress(build: Any) -> Any:
    """Run ``build(progress_callback)`` under a model-loading progress bar on stderr (only on a
    terminal, and not under JSON logs: the loader logs its progress too)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if _State.json_logs or not err.is_terminal:
        return build(None)

    with Progress(TextColumn("loading model"), BarColumn(), TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task("load", total=None)
        return build(lambda done, total: bar.update(task, completed=done, total=total))


def _load(settings: SettingsBase) -> Any:
    """Load the model with a progress bar on stderr."""
    from rocmforge.llm import LLM

    return _with_progress(lambda progress: LLM.from_settings(settings, progress))


def _print_summary(summary: dict[str, Any]) -> None:
    """The human form of ``inspect``. Names and values come from the file: they are printed as
    text (``Text``), never read as rich markup."""
    from rich.text import Text

    title = Text(str(summary["name"] or Path(summary["path"]).name), style="bold")
    title.append(f"  ({summary['architecture']}, GGUF v{summary['gguf_version']})", style="")
    out.print(title)
    out.print(
        f"{summary['parameters'] / 1e6:.1f}M parameters, {_size(summary['weight_bytes'])} of weights "
        f"({summary['bits_per_weight']} bits/weight), file {_size(summary['file_bytes'])}", markup=False,
    )
    hyper = summary.get("hyperparameters") or {}
    if hyper:
        table = Table("hyper-parameter", "value", title="model")
        for key, value in hyper.items():
            table.add_row(Text(key), Text(str(value)))
        out.print(table)
    quant = Table("type", "parameters", "share", "bytes", title="quantization mix")
    for name, row in summary["quantization"].items():
        quant.add_row(Text(name), f"{row['parameters']:,}", f"{100 * row['fraction']:.1f} %", _size(row["bytes"]))
    out.print(quant)
    memory = summary.get("memory")
    if memory:
        out.print(
            f"memory: weights {_size(memory['weights_bf16_bytes'])} bf16 / {_size(memory['weights_fp32_bytes'])} fp32; "
            f"KV cache {_size(memory['kv_cache_bytes_per_token_bf16'])}/token bf16, "
            f"{_size(memory['kv_cache_full_context_bf16_bytes'])} for the full context", markup=False,
        )
    tensors = Table("tensor", "type", "shape", "bytes", title=f"{len(summary['tensors'])} tensors")
    for t in summary["tensors"]:
        tensors.add_row(Text(t["name"]), Text(t["type"]), "x".join(map(str, t["shape"])), _size(t["bytes"]))
    out.print(tensors)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def main() -> None:
    """Entry point. Usage errors are reported by typer itself (exit 2); every other error
    becomes one line on stderr and a documented exit code."""
    try:
        app()
    except Exception as exc:
        sys.exit(_report(exc))


def _report(exc: Exception) -> int:
    if _State.debug:
        err.print_exception()
    if isinstance(exc, ServerUnreachable):
        _error_line(str(exc))
        return EXIT_UNREACHABLE
    if isinstance(exc, (ModelNotFoundError, RequestNotFoundError)):
        _error_line(str(exc))
        return EXIT_NOT_FOUND
    if isinstance(exc, ConfigError):
        _error_line(str(exc))
        return EXIT_USAGE
    if isinstance(exc, RocmForgeError):
        _error_line(str(exc))
        return EXIT_RUNTIME
    _error_line(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)")
    return EXIT_RUNTIME


def _error_line(message: str) -> None:
    """One line on stderr, however long (no wrapping), with the message's brackets shown
    as text rather than read as rich markup (a JSON record under JSON logs)."""
    from rich.markup import escape

    if _State.json_logs:
        _json_line(logging.ERROR, message)
        return
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def _notice(message: str) -> None:
    """A line the CLI writes to stderr on purpose, whatever the log level: plain text, or a
    JSON record (level INFO, logger ``rocmforge.cli``) under JSON logs."""
    if _State.json_logs:
        _json_line(logging.INFO, message)
        return
    err.print(message, highlight=False, soft_wrap=True, markup=False)


def _json_line(level: int, message: str) -> None:
    record = logging.LogRecord("rocmforge.cli", level, __file__, 0, message, None, None)
    sys.stderr.write(JsonFormatter().format(record) + "\n")
    sys.stderr.flush()
