"""Fault injection (``ROCMFORGE_FAULT_INJECT``, a testing aid) against real servers, and the
failure isolation of the model runner in-process.

* ``forward_error:<prefix>``: the request that raises gets a 500 in the error shape (an SSE
  ``error`` event when streamed) while the requests batched with it complete;
* ``forward_fatal:<prefix>``: the engine dies, every in-flight request gets an error within
  5 s, ``/health`` and ``/ready`` answer 503, and SIGTERM still exits 0;
* ``gpu_init`` with ``--device auto``: the server starts on the CPU and says so in its log
  and in ``/health``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse
from live_server import HTTP_TIMEOUT, Server, assert_error_shape, stop_server
from spawned_server import Background, running, spawn_server, stream_events, wait_for, wait_ready

from rocmforge.engine.request import FinishReason
from rocmforge.errors import ConfigError, DeviceError
from rocmforge.llm import LLM
from rocmforge.sampling_params import SamplingParams
from rocmforge.settings import Settings
from rocmforge.testing.fault_spec import FaultInjection

OK_TOKENS = 300
"""With ``ignore_eos``: long enough to still run when the faulty request arrives."""
FATAL_DEADLINE_S = 5.0



def long_body(max_tokens: int = OK_TOKENS) -> dict:
    return {"prompt": "Hello", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


# --- parsing ----------------------------------------------------------------------------------------


def test_fault_spec_parsing() -> None:
    assert FaultInjection.parse("") == FaultInjection()
    assert not FaultInjection.parse(None).active
    faults = FaultInjection.parse(" gpu_init , forward_error:boom,forward_error:bad/,forward_fatal:fatal")
    assert faults == FaultInjection(gpu_init=True, forward_error=("boom", "bad/"), forward_fatal=("fatal",))
    assert faults.active
    for bad in ("gpu", "forward_error", "forward_error:", "forward_fatal: ", "gpu_init:x", "explode:now"):
        with pytest.raises(ConfigError) as info:
            FaultInjection.parse(bad)
        assert info.value.param == "fault_inject", bad


def test_fault_spec_is_read_and_validated_by_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROCMFORGE_FAULT_INJECT", "forward_error:boom")
    assert Settings(_env_file=None).faults() == FaultInjection(forward_error=("boom",))
    monkeypatch.setenv("ROCMFORGE_FAULT_INJECT", "forward_error")
    with pytest.raises(ValueError, match="bad fault spec"):
        Settings(_env_file=None)


# --- in-process: the runner isolates the failing request --------------------------------------------


@pytest.fixture(scope="module")
def faulty_llm(tiny_gguf: Path) -> LLM:
    return LLM(tiny_gguf, device="cpu", dtype="float32", kv_cache_memory=8 << 20,
               faults=FaultInjection(forward_error=("boom",)))


def _run_engine(llm: LLM, requests: dict[str, int]) -> dict[str, tuple[list[int], str | None, str | None]]:
    """Run ``{request_id: max_tokens}`` together to the end: id -> (tokens, finish reason, error)."""
    engine = llm.engine
    prompt = llm.tokenize("Hello", add_special=True)
    for request_id, max_tokens in requests.items():
        engine.add_request(request_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    finals: dict[str, tuple[str | None, str | None]] = {}
    for _ in range(10 * max(requests.values())):
        if not engine.has_unfinished():
            break
        for output in engine.step():
            tokens[output.request_id].extend(output.new_token_ids)
            if output.finished:
                finals[output.request_id] = (output.finish_reason, output.error)
    assert not engine.has_unfinished()
    return {rid: (tokens[rid], *finals[rid]) for rid in requests}


def test_runner_fails_only_the_faulty_request_of_a_batch(faulty_llm: LLM) -> None:
    alone = _run_engine(faulty_llm, {"ok-alone": 12})
    together = _run_engine(faulty_llm, {"ok-a": 12, "boom-1": 12, "ok-b": 6})
    for rid, count in (("ok-a", 12), ("ok-b", 6)):
        token_ids, reason, error = together[rid]
        assert (reason, error) == (FinishReason.LENGTH.value, None), together[rid]
        # Isolation re-runs the batch request by request: the survivors' tokens are unchanged.
        assert token_ids == alone["ok-alone"][0][:count]
    token_ids, reason, error = together["boom-1"]
    assert reason == FinishReason.ERROR.value and token_ids == []
    assert error is not None and "ModelExecutionError" in error and "boom-1" in error
    # The failed request's KV blocks went back to the pool.
    assert faulty_llm.engine.scheduler.block_manager.num_free_blocks == faulty_llm.engine.runner.num_blocks


def test_a_batch_whose_requests_all_fail_alone_fails_them_and_goes_on(faulty_llm: LLM) -> None:
    """Every request fails alone too, but the device passes its probe (a pass with no
    request): the requests are at fault, they fail; the step does not raise."""
    engine = faulty_llm.engine
    prompt = faulty_llm.tokenize("Hello", add_special=True)
    for rid in ("boom-x", "boom-y"):
        engine.add_request(rid, prompt, SamplingParams(max_tokens=4))
    outputs = {o.request_id: o for o in engine.step()}
    assert {rid: o.finish_reason for rid, o in outputs.items()} == {"boom-x": "error", "boom-y": "error"}
    assert not engine.has_unfinished()
    assert engine.scheduler.block_manager.num_free_blocks == engine.runner.num_blocks


def test_a_lost_device_makes_the_step_raise(tiny_gguf: Path) -> None:
    """``device_lost``: from the first pass holding the request on, every pass and every
    probe fails: no request is to blame, the step raises (the AsyncEngine counts it)."""
    llm = LLM(tiny_gguf, device="cpu", dtype="float32", kv_cache_memory=8 << 20,
              faults=FaultInjection(device_lost=("lose",)))
    engine = llm.engine
    prompt = llm.tokenize("Hello", add_special=True)
    engine.add_request("lose-1", prompt, SamplingParams(max_tokens=4))
    engine.add_request("ok-1", prompt, SamplingParams(max_tokens=4))
    with pytest.raises(DeviceError, match="injected device loss since request 'lose-1'"):
        engine.step()
    for rid in ("lose-1", "ok-1"):
        assert engine.abort(rid, FinishReason.ERROR)
    engine.add_request("ok-2", prompt, SamplingParams(max_tokens=4))  # the device stays lost
    with pytest.raises(DeviceError):
        engine.step()
    assert engine.abort("ok-2", FinishReason.ERROR)


# --- a real server: forward_error and gpu_init ----------------------------------------------------------


@pytest.fixture(scope="module")
def faulty_server(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``--device auto`` with a failing GPU initialisation, and requests ``boom*`` failing."""
    with running(spawn_server(tiny_gguf, tmp_path_factory.mktemp("faulty-server"), device="auto",
                              env={"ROCMFORGE_FAULT_INJECT": "gpu_init,forward_error:boom"})) as server:
        yield server


def test_gpu_init_failure_under_auto_falls_back_to_the_cpu(faulty_server: Server) -> None:
    health = httpx.get(f"{faulty_server.url}/health", timeout=HTTP_TIMEOUT)
    assert health.status_code == 200, health.text
    device = health.json()["device"]
    assert device["name"] == "cpu" and device["fallback"] is True
    assert "simulated GPU initialisation failure" in device["fallback_reason"]
    memory = health.json()["memory"]
    assert memory["kind"] == "process_rss" and 0 < memory["used_bytes"] < memory["total_bytes"], memory
    plan = memory["plan"]
    assert plan["kv_blocks"] > 0 and plan["weights_bytes"] > 0 and plan["workspace_bytes"] > 0, plan
    assert plan["kv_cache_bytes"] % (plan["kv_blocks"] + 1) == 0 and plan["reserve_bytes"] == 0, plan
    log = faulty_server.log()
    assert "falling back to the CPU" in log and "simulated GPU initialisation failure" in log, log
    assert "device cpu (GPU fallback:" in log, log


def test_gpu_init_failure_with_an_explicit_cuda_device_is_an_error(tiny_gguf: Path) -> None:
    with pytest.raises(DeviceError) as info:
        LLM(tiny_gguf, device="cuda", faults=FaultInjection(gpu_init=True))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "simulated GPU initialisation failure" in str(info.value)


def test_a_failing_request_gets_an_error_while_the_others_complete(faulty_server: Server) -> None:
    url = faulty_server.url
    started = {rid: threading.Event() for rid in ("ok-stream-1", "ok-stream-2")}
    streams = {rid: Background(lambda rid=rid: stream_events(url, long_body(), rid, started[rid])) for rid in started}
    plain = Background(lambda: httpx.post(f"{url}/generate", json=long_body(), headers={"X-Request-Id": "ok-plain"},
                                          timeout=HTTP_TIMEOUT))
    assert all(event.wait(10.0) for event in started.values()), faulty_server.log()

    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT) as client:
        # Joins the running batch; its step fails; only it is failed.
        failed = client.post("/generate", json=long_body(), headers={"X-Request-Id": "boom-plain"})
        error = assert_error_shape(failed, 500, "model_execution_failed")
        assert error["request_id"] == "boom-plain" and "injected forward fault" in error["message"]
        with connect_sse(client, "POST", "/generate/stream", json=long_body(),
                         headers={"X-Request-Id": "boom-stream"}) as src:
            events = list(src.iter_sse())
        assert [e.event for e in events] == ["error"], events
        stream_error = events[0].json()["error"]
        assert stream_error["request_id"] == "boom-stream" and "injected forward fault" in stream_error["message"]
        openai = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4},
                             headers={"X-Request-Id": "boom-openai"})
        assert_error_shape(openai, 500, "model_execution_failed")
        assert client.get("/status/boom-plain").json()["finish_reason"] == "error"
        # It failed inside a batch with the long requests (which were still running), and
        # only it failed when the runner re-ran the batch request by request.
        log = faulty_server.log()
        assert any("batched step of" in line and "'boom-plain'" in line for line in log.splitlines()), log

        for background in streams.values():
            rest = background.result(60.0)
            assert rest[-1].event == "done", rest[-3:]
            done = rest[-1].json()
            assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == OK_TOKENS, done
        response = plain.result(60.0)
        assert response.status_code == 200, response.text
        assert response.json()["finish_reason"] == "length"
        assert response.json()["num_generated_tokens"] == OK_TOKENS
        # The engine keeps serving.
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
        after = client.post("/generate", json={"prompt": "Hi", "max_tokens": 3, "ignore_eos": True})
        assert after.status_code == 200 and after.json()["num_generated_tokens"] == 3


def test_requests_that_fail_alone_in_a_row_never_kill_the_engine(faulty_server: Server) -> None:
    """Each ``boom`` request is alone in its steps and fails every pass: one after the other,
    more of them than ``max_consecutive_failures``, each gets its 500 and the engine lives
    (the device passes its probe: the requests, not the device, are at fault)."""
    with httpx.Client(base_url=faulty_server.url, timeout=HTTP_TIMEOUT) as client:
        for i in range(5):
            failed = client.post("/generate", json={"prompt": "Hi", "max_tokens": 2},
                                 headers={"X-Request-Id": f"boom-alone-{i}"})
            assert_error_shape(failed, 500, "model_execution_failed")
        assert client.get("/health").json()["status"] == "ok"
        after = client.post("/generate", json={"prompt": "Hi", "max_tokens": 3, "ignore_eos": True})
        assert after.status_code == 200 and after.json()["num_generated_tokens"] == 3, after.text
    assert "engine dead" not in faulty_server.log()


def test_a_lost_device_kills_the_engine_after_a_few_steps(
    tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``device_lost``: every pass and every probe fails from then on; no request is to blame,
    so after ``max_consecutive_failures`` such steps the engine is dead, /health says so, and
    SIGTERM still exits 0."""
    server = spawn_server(tiny_gguf, tmp_path_factory.mktemp("lost-device"),
                          env={"ROCMFORGE_FAULT_INJECT": "device_lost:lose"})
    with running(server), httpx.Client(base_url=server.url, timeout=HTTP_TIMEOUT) as client:
        first = client.post("/generate", json={"prompt": "Hi", "max_tokens": 2}, headers={"X-Request-Id": "lose-1"})
        assert_error_shape(first, 500)
        codes = [client.post("/generate", json={"prompt": "Hi", "max_tokens": 2}).status_code for _ in range(3)]
        assert codes[-1] == 503, codes
        health = client.get("/health")
        assert health.status_code == 503 and "3 engine steps failed in a row" in health.json()["checks"]["engine_loop"]
        assert_error_shape(client.post("/generate", json={"prompt": "Hi", "max_tokens": 2}), 503, "engine_dead")


# --- a real server: forward_fatal ---------------------------------------------------------------


def test_a_fatal_error_fails_everything_in_flight_and_the_probes(
    tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = spawn_server(tiny_gguf, tmp_path_factory.mktemp("fatal-server"),
                          env={"ROCMFORGE_FAULT_INJECT": "forward_fatal:fatal"})
    try:
        wait_ready(server)
        url = server.url
        started = threading.Event()
        stream = Background(lambda: stream_events(url, long_body(4000), "victim-stream", started))
        plain = Background(lambda: httpx.post(f"{url}/generate", json=long_body(4000),
                                              headers={"X-Request-Id": "victim-plain"}, timeout=HTTP_TIMEOUT))
        assert started.wait(10.0), server.log()
        with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT) as client:
            assert wait_for(lambda: client.get("/status/victim-plain").status_code == 200, 5.0)
            t0 = time.monotonic()
            fatal = client.post("/generate", json=long_body(), headers={"X-Request-Id": "fatal-1"})
            assert_error_shape(fatal, 503, "engine_dead")
            events = stream.result(FATAL_DEADLINE_S)
            assert events[-1].event == "error", events[-3:]
            assert "engine died" in events[-1].json()["error"]["message"]
            victim = plain.result(FATAL_DEADLINE_S)
            assert_error_shape(victim, 503, "engine_dead")
            assert time.monotonic() - t0 < FATAL_DEADLINE_S

            health = client.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "dead", health.text
            assert "injected fatal fault" in health.json()["checks"]["engine_loop"]
            ready = client.get("/ready")
            assert ready.status_code == 503 and ready.json()["reason"].startswith("engine is dead"), ready.text
            refused = client.post("/generate", json={"prompt": "Hi", "max_tokens": 2})
            assert_error_shape(refused, 503, "engine_dead")
    finally:
        stop_server(server)
    assert server.process.returncode == 0, server.log()

