"""rocmforge.logs: formats, request context, per-module levels, idempotence, rotation."""

from __future__ import annotations

import io
import json
import logging
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from rocmforge.errors import ConfigError
from rocmforge.logs import bind_request, parse_level_spec, request_id_var, setup_logging
from rocmforge.settings import Settings


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Put the root logger and every named logger back as they were, closing our handlers."""
    manager = logging.Logger.manager
    root = logging.getLogger()
    saved_root = (root.level, list(root.handlers))
    saved = {
        name: (logger.level, list(logger.handlers), logger.propagate, logger.disabled)
        for name, logger in manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    yield
    logging.captureWarnings(False)
    for handler in root.handlers:
        if handler not in saved_root[1]:
            handler.close()
    root.setLevel(saved_root[0])
    root.handlers[:] = saved_root[1]
    for name, logger in manager.loggerDict.items():
        if not isinstance(logger, logging.Logger):
            continue
        if name in saved:
            logger.level, handlers, logger.propagate, logger.disabled = saved[name]
            logger.handlers[:] = handlers
        else:
            logger.setLevel(logging.NOTSET)
            logger.handlers[:] = []
    manager._clear_cache()


def _json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _json_setup(level: str = "debug") -> io.StringIO:
    stream = io.StringIO()
    setup_logging(level, "json", stream=stream)
    return stream


def _only_our_handlers() -> None:
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if getattr(h, "_rocmforge_handler", False)]


# --- JSON format ------------------------------------------------------------------------


def test_json_normal_message_has_the_documented_fields() -> None:
    stream = _json_setup("info")
    logging.getLogger("rocmforge.server").info("listening on %s:%d", "127.0.0.1", 8080)
    (line,) = _json_lines(stream)
    assert line["level"] == "INFO"
    assert line["logger"] == "rocmforge.server"
    assert line["message"] == "listening on 127.0.0.1:8080"
    assert line["ts"].endswith("Z") and "T" in line["ts"] and len(line["ts"].split(".")[1]) == 4  # mmm + Z
    assert "request_id" not in line and "trace_id" not in line and "exc_info" not in line


def test_json_exception_is_a_formatted_string() -> None:
    stream = _json_setup()
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("rocmforge.engine").exception("step failed")
    (line,) = _json_lines(stream)
    assert line["level"] == "ERROR"
    assert line["message"] == "step failed"
    assert isinstance(line["exc_info"], str)
    assert "Traceback" in line["exc_info"] and "ValueError: boom" in line["exc_info"]


def test_json_extras_are_included_and_made_serialisable() -> None:
    class Opaque:
        def __repr__(self) -> str:
            return "<Opaque>"

    stream = _json_setup()
    logging.getLogger("rocmforge.engine").info(
        "finished",
        extra={"tokens": 12, "reason": "stop", "obj": Opaque(), "tags": {1: "a"}, "pairs": {(1, 2): "a"}, "nan": float("nan"),
               "level": "clash", "color_message": "\x1b[1mfinished\x1b[0m"},
    )
    (line,) = _json_lines(stream)
    assert line["tokens"] == 12 and line["reason"] == "stop"
    assert line["obj"] == "<Opaque>"
    assert line["tags"] == {"1": "a"}  # json's own key coercion
    assert line["pairs"] == "{(1, 2): 'a'}"  # keys json refuses: the whole value as repr
    assert line["nan"] == "nan"  # strict JSON has no NaN
    assert line["level"] == "INFO" and line["extra_level"] == "clash"  # core fields win
    assert "color_message" not in line


def test_json_never_raises_on_odd_messages() -> None:
    class BadStr:
        def __str__(self) -> str:
            raise RuntimeError("no str")

        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    stream = _json_setup()
    _only_our_handlers()  # pytest's capture handler re-raises formatting errors by design
    log = logging.getLogger("rocmforge.odd")
    log.info({"a": 1})
    log.info(42)
    log.info("%d items", "not a number")
    log.info("%s and %s", "only one")
    log.info("no placeholders", "extra arg")
    log.info(BadStr())
    log.info("ünïcödé ✓ \n second line")
    lines = _json_lines(stream)
    assert len(lines) == 7
    assert lines[0]["message"] == "{'a': 1}"
    assert lines[1]["message"] == "42"
    assert lines[2]["message"].startswith("%d items") and "not a number" in lines[2]["message"]
    assert lines[3]["message"].startswith("%s and %s") and "only one" in lines[3]["message"]
    assert lines[4]["message"].startswith("no placeholders") and "extra arg" in lines[4]["message"]
    assert "BadStr" in lines[5]["message"]
    assert lines[6]["message"] == "ünïcödé ✓ \n second line"


# --- request context --------------------------------------------------------------------


def test_request_id_comes_from_the_context_variable() -> None:
    stream = _json_setup()
    log = logging.getLogger("rocmforge.server")
    with bind_request("req-1", trace_id="trace-9"):
        log.info("inside")
        assert request_id_var.get() == "req-1"
    log.info("outside")
    inside, outside = _json_lines(stream)
    assert inside["request_id"] == "req-1" and inside["trace_id"] == "trace-9"
    assert "request_id" not in outside and "trace_id" not in outside
    assert request_id_var.get() is None


def test_request_id_from_extra_wins_and_works_in_another_thread() -> None:
    stream = _json_setup()
    log = logging.getLogger("rocmforge.engine.async_engine")

    def engine_thread() -> None:  # contextvars do not cross into a thread started earlier
        log.info("cancelled %s", "req-2", extra={"request_id": "req-2"})
        log.info("no request")

    with bind_request("req-outer"):
        thread = threading.Thread(target=engine_thread)
        thread.start()
        thread.join()
        log.info("explicit", extra={"request_id": "req-3"})
    from_thread, none, explicit = _json_lines(stream)
    assert from_thread["request_id"] == "req-2"
    assert "request_id" not in none
    assert explicit["request_id"] == "req-3"


def test_bind_request_nests_and_restores() -> None:
    with bind_request("a"):
        with bind_request("b"):
            assert request_id_var.get() == "b"
        assert request_id_var.get() == "a"
    assert request_id_var.get() is None


# --- levels -----------------------------------------------------------------------------


def test_per_module_levels() -> None:
    stream = _json_setup("warn,rocmforge.engine=debug,uvicorn.access=error")
    logging.getLogger("rocmforge.engine.scheduler").debug("engine debug")
    logging.getLogger("rocmforge.gguf").debug("gguf debug")
    logging.getLogger("rocmforge.gguf").warning("gguf warning")
    logging.getLogger("uvicorn.access").warning("access warning")
    logging.getLogger("uvicorn.access").error("access error")
    messages = [line["message"] for line in _json_lines(stream)]
    assert messages == ["engine debug", "gguf warning", "access error"]


def test_a_later_setup_resets_levels_of_the_earlier_spec() -> None:
    setup_logging("warn,rocmforge.engine=debug", stream=io.StringIO())
    stream = _json_setup("warn")
    logging.getLogger("rocmforge.engine").debug("hidden now")
    logging.getLogger("rocmforge.engine").warning("shown")
    assert [line["message"] for line in _json_lines(stream)] == ["shown"]


def test_level_spec_parsing() -> None:
    spec = parse_level_spec(" WARNING , rocmforge.engine = Debug,uvicorn=error")
    assert spec.root == logging.WARNING
    assert spec.loggers == {"rocmforge.engine": logging.DEBUG, "uvicorn": logging.ERROR}
    assert parse_level_spec("rocmforge=info").root == logging.WARNING  # default root level
    assert parse_level_spec("info").root == logging.INFO


@pytest.mark.parametrize(
    ("spec", "bad_part"),
    [
        ("loud", "'loud'"),
        ("warn,rocmforge.engine=chatty", "'chatty'"),
        ("warn,=debug", "'=debug'"),
        ("warn,,info", "empty entry"),
        ("", "empty"),
        ("warn,info", "'info'"),
        ("a=info,a=debug", "'a'"),
    ],
)
def test_invalid_level_spec_raises_config_error(spec: str, bad_part: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        setup_logging(spec, stream=io.StringIO())
    assert bad_part in excinfo.value.message
    assert excinfo.value.param == "log_level"


def test_invalid_format_and_sizes_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="xml"):
        setup_logging("warn", "xml", stream=io.StringIO())
    with pytest.raises(ConfigError, match="size"):
        setup_logging("warn", file="x.log", max_file_bytes=0, stream=io.StringIO())


# --- idempotence, file, human format, uvicorn, warnings ---------------------------------


def test_setup_twice_gives_one_line_per_record(tmp_path: Path) -> None:
    first = io.StringIO()
    setup_logging("info", "json", tmp_path / "a.log", stream=first)
    second = io.StringIO()
    setup_logging("info", "json", tmp_path / "a.log", stream=second)
    logging.getLogger("rocmforge.x").info("once")
    assert first.getvalue() == ""
    assert [line["message"] for line in _json_lines(second)] == ["once"]
    file_lines = (tmp_path / "a.log").read_text().splitlines()
    assert [json.loads(line)["message"] for line in file_lines] == ["once"]
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_rocmforge_handler", False)]
    assert len(ours) == 2


def test_file_is_json_and_rotates_when_over_size(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "rocmforge.log"  # parent is created
    setup_logging("info", "human", path, stream=io.StringIO(), max_file_bytes=400, backup_count=2)
    log = logging.getLogger("rocmforge.rotate")
    for i in range(40):
        log.info("message number %03d with some padding to fill the file", i)
    backups = sorted(p.name for p in path.parent.iterdir())
    assert backups == ["rocmforge.log", "rocmforge.log.1", "rocmforge.log.2"]
    for file in path.parent.iterdir():
        assert file.stat().st_size <= 400
        for line in file.read_text().splitlines():
            assert json.loads(line)["logger"] == "rocmforge.rotate"
    last = json.loads(path.read_text().splitlines()[-1])
    assert last["message"].startswith("message number 039")


def test_unopenable_log_file_raises_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="log file"):
        setup_logging("warn", file=blocker / "x.log", stream=io.StringIO())


def test_human_format_has_time_level_logger_and_request_id() -> None:
    stream = io.StringIO()
    setup_logging("info", "human", stream=stream)
    with bind_request("req-h"):
        logging.getLogger("rocmforge.server").warning("slow client", extra={"waited_s": 2.5})
    line = stream.getvalue().rstrip("\n")
    assert "\x1b[" not in line  # StringIO is not a TTY: no colour
    stamp, level, rest = line.split(maxsplit=2)
    assert len(stamp) == 12 and stamp[2] == ":" and stamp[8] == "."
    assert level == "WARNING"
    assert rest == "rocmforge.server: slow client [request_id=req-h waited_s=2.5]"


def test_human_format_colour_and_traceback() -> None:
    stream = io.StringIO()
    setup_logging("info", "human", stream=stream, color=True)
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        logging.getLogger("rocmforge.x").exception("failed")
    first, *rest = stream.getvalue().splitlines()
    assert "\x1b[31mERROR" in first and first.endswith("rocmforge.x: failed")
    assert rest[0].startswith("Traceback") and rest[-1] == "ZeroDivisionError: division by zero"


def test_uvicorn_records_come_out_formatted() -> None:
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # as uvicorn's dictConfig leaves them
        logger = logging.getLogger(name)
        logger.addHandler(logging.StreamHandler(io.StringIO()))
        logger.propagate = name == "uvicorn.error"
        logger.setLevel(logging.INFO)
    stream = _json_setup("info")
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 123,
                                            extra={"color_message": "Started ..."})
    logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "GET", "/health", "1.1", 200)
    started, access = _json_lines(stream)
    assert started["logger"] == "uvicorn.error" and started["message"] == "Started server process [123]"
    assert "color_message" not in started
    assert access["logger"] == "uvicorn.access" and access["message"] == '127.0.0.1:5 - "GET /health HTTP/1.1" 200'
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        assert logging.getLogger(name).handlers == [] and logging.getLogger(name).propagate


def test_python_warnings_are_logged() -> None:
    stream = _json_setup("warn")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("old api", DeprecationWarning, stacklevel=1)
    (line,) = _json_lines(stream)
    assert line["logger"] == "py.warnings" and "DeprecationWarning: old api" in line["message"]


# --- settings ---------------------------------------------------------------------------


def test_settings_log_fields(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ROCMFORGE_LOG_FILE", str(tmp_path / "r.log"))
    monkeypatch.setenv("ROCMFORGE_LOG_FORMAT", "JSON")
    monkeypatch.setenv("NO_COLOR", "1")
    settings = Settings(_env_file=None)
    assert settings.log_file == tmp_path / "r.log"
    assert settings.log_format == "json"
    assert settings.log_file_max_bytes == 10 << 20 and settings.log_file_backups == 5
    assert settings.no_color is True


def test_settings_reject_bad_log_format_and_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROCMFORGE_LOG_FORMAT", "xml")
    with pytest.raises(ValidationError, match="log_format must be 'human' or 'json'"):
        Settings(_env_file=None)
    monkeypatch.delenv("ROCMFORGE_LOG_FORMAT")
    monkeypatch.setenv("ROCMFORGE_LOG_LEVEL", "warn,rocmforge.engine=loud")
    with pytest.raises(ValidationError, match="'loud'"):
        Settings(_env_file=None)
