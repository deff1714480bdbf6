"""Zero-loss operations on the real stack, done for real while streaming clients run
(`scripts/drill.py` accounts for every request):

- an engine that dies under a replica: requests routed to it are sent again to the other replica
  before their first token, and the client sees no error;
- a replica killed mid-stream, with a second replica: every stream completes with its exact
  token count, the resumed ones with the same text as the uninterrupted ones (greedy);
- every replica of the model killed: streams past their first token end at once with a clear
  error event, requests before it and new requests get 503 `engine_unavailable` with a Retry-After
  within the queue timeout (no wait into a 504), and the replacements serve the next requests;
- `serve deploy` of an edited file that changes only live settings (a limit, a key added then
  removed, an admission deadline): in force within seconds, no replica process restarted, no
  request failed;
- `serve deploy` of an edited file that adds a model whose build fails (a wrong path) with a
  live change: the model is taken back within seconds, the live change stays;
- `serve deploy` of an edited file that changes an engine setting: the new replicas start before
  the old ones stop, no request fails, and the other model's replica and the ingress are not
  touched;
- `serve deploy` of an edited file that changes the replica count or the autoscaling bounds:
  applied within seconds without restarting a replica, a scale-down from 2 to 1 under streaming
  load cuts no stream, and a raised minimum starts a replica; a roll of an autoscaled model
  keeps its count;
- stopping the gateway with `scripts/stop.py`: the streams in flight finish (`serve shutdown`
  alone cuts them).

The app is deployed as operators do, with `serve deploy` of a config file (Serve's REST API on
the dashboard), on a 2-CPU Ray instance: the model under test with two replicas, and a second
model with one.
"""

from __future__ import annotations

import glob
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import ray
import yaml
from ray import serve
from ray.serve.schema import ApplicationStatus, ReplicaState

from apps.applications import MODEL_IMPORT_PATH, deployment_name
from apps.edge.auth import key_hash
from scripts.drill import COMPLETE, DrillReport, DrillSettings, DrillThread
from tests.conftest import app_args
from tests.conftest import serve_config as whole_serve_config

PORT = 18800
URL = f"http://127.0.0.1:{PORT}"
MODEL = "tiny-chat"
OTHER = "tiny-chat-b"  # a second model, on the same checkpoint
REPLICA_CLASS = f"ServeReplica:{deployment_name(MODEL)}:{deployment_name(MODEL)}"
DRILL_KEY, BOB_KEY = "sk-ops-drill", "sk-ops-bob"
QUEUE_TIMEOUT_S = 6.0
STREAM_TOKENS = 200
RECOVERY_TIMEOUT_S = 300
# The engine setting the rolling-update test changes, which the tests after it keep (or they roll).
ROLLED_MAX_NUM_SEQS = 48
SERVE = str(Path(sys.executable).parent / "serve")


def serve_config(
    max_num_seqs: int = 64,
    max_tokens_cap: int = 512,
    bob: bool = False,
    other_timeout_s: float = 600,
    replicas: dict[str, Any] | None = None,
) -> dict[str, Any]:
    args = app_args("app.yaml", local_paths=True)
    (model,) = [m for m in args["models"] if m["id"] == MODEL]
    model["engine"]["max_num_seqs"] = max_num_seqs
    model["replicas"] = replicas or {"num_replicas": 2}
    model["admission"] = {"queue_timeout_s": QUEUE_TIMEOUT_S}
    model["limits"]["max_tokens_cap"] = max_tokens_cap
    other = {
        "id": OTHER,
        "path": model["path"],
        "engine": model["engine"] | {"max_num_seqs": 64},
        "parallelism": model["parallelism"],
        "admission": {"request_timeout_s": other_timeout_s},
    }
    args["models"] = [model, other]
    keys = [{"name": "drill", "sha256": key_hash(DRILL_KEY)}]
    if bob:
        keys.append({"name": "bob", "sha256": key_hash(BOB_KEY), "requests_per_minute": 2})
    args["auth"] = {"enabled": True, "keys": keys}
    return whole_serve_config(args, PORT)


def serve_deploy(config: dict[str, Any], path: Path) -> None:
    """`serve deploy FILE`, as an operator runs it."""
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([SERVE, "deploy", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[Path]:
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)  # dashboard: serve deploy's API
    try:
        config_file = tmp_path_factory.mktemp("ops") / "app.yaml"
        serve_deploy(serve_config(), config_file)
        wait_until_serving(2)
        yield config_file
    finally:
        serve.shutdown()
        ray.shutdown()


def running_replicas() -> int | None:
    """RUNNING replicas of the model; None while Serve reports no deployment (a rebuild)."""
    status = serve.status().applications.get(deployment_name(MODEL))
    if status is None or deployment_name(MODEL) not in status.deployments:
        return None
    return status.deployments[deployment_name(MODEL)].replica_states.get(ReplicaState.RUNNING, 0)


def wait_until_serving(replicas: int, replaced: set[int] = frozenset()) -> None:
    """Until the app is RUNNING with `replicas` replicas of the model, none of them the
    processes `replaced`, and answers."""
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while time.monotonic() < deadline:
        applications = serve.status().applications.values()
        settled = len(applications) == 4 and all(a.status == ApplicationStatus.RUNNING for a in applications)
        gone = replaced.isdisjoint(p.pid for p in replica_processes())
        if settled and gone and running_replicas() == replicas and _answers():
            return
        time.sleep(1)
    pytest.fail(f"the app did not get back to {replicas} serving replicas: {serve.status()}")


def chat(model: str = MODEL, max_tokens: int = 2, key: str = DRILL_KEY, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{URL}/v1/chat/completions", json=body | extra, headers=headers, timeout=60)


def _answers() -> bool:
    try:
        return chat().status_code == 200
    except httpx.HTTPError:
        return False


def replica_processes(replica_class: str = REPLICA_CLASS) -> list[psutil.Process]:
    return [
        process
        for process in psutil.process_iter(["cmdline"])
        if (process.info["cmdline"] or [""])[0].startswith(f"ray::{replica_class}")
    ]


def serve_replica_pids() -> set[int]:
    """Every Serve replica's process: models, ingress, rate limiter, settings."""
    return {p.pid for p in replica_processes("ServeReplica:")}


def engine_and_gateway_pids() -> set[int]:
    """The processes a live settings change must leave alone: every replica but the settings'."""
    return {p.pid for p in replica_processes("ServeReplica:") if "llm-settings" not in p.info["cmdline"][0]}


def busiest(processes: list[psutil.Process], window_s: float = 1.5) -> psutil.Process:
    """The replica whose process tree used the most CPU over `window_s` (the one streaming)."""

    def cpu(process: psutil.Process) -> float:
        tree = [process, *process.children(recursive=True)]
        return sum(p.cpu_times().user + p.cpu_times().system for p in tree)

    before = {p.pid: cpu(p) for p in processes}
    time.sleep(window_s)
    return max(processes, key=lambda p: cpu(p) - before[p.pid])


def ingress_log_lines(text: str) -> list[str]:
    lines = []
    for path in glob.glob("/tmp/ray/session_latest/logs/serve/replica_llm_ingress_*.log"):
        lines += [line for line in Path(path).read_text(errors="replace").splitlines() if text in line]
    return lines


def drill(streams: int = 6) -> DrillThread:
    settings = DrillSettings(
        URL, MODEL, streams=streams, max_tokens=STREAM_TOKENS, api_key=DRILL_KEY, temperature=0
    )
    return DrillThread(settings).start()


def wait_for_completions(running: DrillThread, count: int, limit_s: float = 240) -> None:
    target = running.completed() + count
    deadline = time.monotonic() + limit_s
    while running.completed() < target:
        assert time.monotonic() < deadline, f"fewer than {count} requests completed in {limit_s:.0f}s"
        time.sleep(0.2)


def assert_all_complete(report: DrillReport) -> None:
    assert report.outcomes, "the drill sent nothing"
    assert not report.failures, report.summary()


def test_requests_routed_to_a_dead_engine_are_sent_again_to_the_other_replica(gateway):
    retried_before = len(ingress_log_lines("before its first token"))
    replica = replica_processes()[0]
    engines = [p for p in replica.children() if "EngineCore" in " ".join(p.cmdline())]
    assert engines, "no engine core process under the replica"
    for engine in engines:
        engine.kill()
    statuses = []
    for i in range(16):  # distinct prompts: the router spreads them over both replicas
        messages = [{"role": "user", "content": f"question {i} " * 40}]
        response = chat(max_tokens=4, messages=messages)
        statuses.append((response.status_code, response.text[:200]))
    assert all(status == 200 for status, _ in statuses), statuses
    assert len(ingress_log_lines("before its first token")) > retried_before, (
        "no request met the dead engine: the test proved nothing"
    )
    wait_until_serving(2, replaced={replica.pid})  # Serve's health check replaces the replica


def test_a_replica_killed_mid_stream_resumes_its_streams_on_the_other_with_every_token(gateway):
    resumed_before = len(ingress_log_lines("resuming on another"))
    running = drill()
    wait_for_completions(running, 6)
    victim = busiest(replica_processes())
    time.sleep(0.5)  # the streams are mid-way
    victim.kill()
    killed_at = running.elapsed_s()
    wait_for_completions(running, 12)
    report = running.stop()
    assert_all_complete(report)
    resumed = len(ingress_log_lines("resuming on another")) - resumed_before
    cut_short = [o for o in report.outcomes if o.started_s < killed_at < o.ended_s]
    assert resumed >= 1 and cut_short, f"no stream was cut by the kill (resumed {resumed})"
    texts = {outcome.text for outcome in report.outcomes}
    assert len(texts) == 1, "a resumed stream's greedy text differs from an uninterrupted one's"
    wait_until_serving(2, replaced={victim.pid})


def test_with_no_replica_left_streams_end_with_an_error_event_and_new_requests_get_503_in_time(gateway):
    running = drill(streams=2)
    wait_for_completions(running, 2)
    victims = replica_processes()
    for process in victims:
        process.kill()
    killed_at = running.elapsed_s()
    started = time.monotonic()
    refused = chat(max_tokens=4)
    waited_s = time.monotonic() - started
    report = running.stop(timeout_s=RECOVERY_TIMEOUT_S)

    cut = [o for o in report.outcomes if o.started_s < killed_at < o.ended_s]
    assert cut, "no stream was running at the kill"
    for outcome in cut:
        if outcome.kind == "error-event:engine_unavailable":  # had its first token: ends at once
            assert outcome.ended_s - killed_at < 3.0, f"learned late: {outcome}"
        elif outcome.kind == "status:503:engine_unavailable":  # had not: waited for a replica
            assert outcome.ended_s - killed_at < QUEUE_TIMEOUT_S + 3.0, f"waited too long: {outcome}"
        else:
            assert outcome.kind == COMPLETE, outcome
    if refused.status_code == 503:  # else a replacement was already up: served, which is fine too
        error = refused.json()["error"]
        assert error["code"] == "engine_unavailable", error
        assert int(refused.headers["retry-after"]) >= 1, refused.headers
    else:
        assert refused.status_code == 200, refused.text
    assert waited_s < QUEUE_TIMEOUT_S + 5, f"waited {waited_s:.1f}s, past the queue timeout"
    assert all(o.kind != "status:504:timeout" for o in report.outcomes), report.summary()
    wait_until_serving(2, replaced={p.pid for p in victims})


def wait_for(condition: Any, what: str, limit_s: float = 30.0) -> float:
    """Seconds until `condition()` held; fails after `limit_s`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < limit_s, f"not within {limit_s:.0f}s: {what}"
        time.sleep(0.25)
    return time.monotonic() - started


def test_live_settings_apply_within_seconds_and_restart_nothing(gateway):
    processes = engine_and_gateway_pids()
    # 2 + 1 model replicas, 2 model entrypoints, the ingress, the rate limiter
    assert len(processes) == 7, processes
    assert chat(max_tokens=400).status_code == 200
    assert chat(key=BOB_KEY).status_code == 401
    long_answer = {"model": OTHER, "max_tokens": 400, "ignore_eos": True}
    assert chat(**long_answer).status_code == 200
    running = drill(streams=4)
    wait_for_completions(running, 4)

    # A lower cap, a new rate-limited key, a 0.3 s request timeout on the other model.
    serve_deploy(serve_config(max_tokens_cap=300, bob=True, other_timeout_s=0.3), gateway)
    took = wait_for(lambda: chat(max_tokens=400).status_code == 400, "the new cap")
    assert took < 15, f"the new cap took {took:.1f}s"
    assert [chat(key=BOB_KEY).status_code for _ in range(3)] == [200, 200, 429], "bob: 2 per minute"
    timed_out = chat(**long_answer)
    assert timed_out.status_code == 504, timed_out.text

    serve_deploy(serve_config(), gateway)  # bob removed, everything as it was
    wait_for(lambda: chat(key=BOB_KEY).status_code == 401, "bob's key removed")
    assert chat(max_tokens=400).status_code == 200
    assert chat(**long_answer).status_code == 200
    wait_for_completions(running, 4)
    report = running.stop()
    assert_all_complete(report)
    assert engine_and_gateway_pids() == processes, "a live settings change restarted a replica"


def served_models() -> list[str]:
    """The models `/v1/models` lists (not their LoRA adapters, which have a `parent`)."""
    response = httpx.get(f"{URL}/v1/models", headers={"Authorization": f"Bearer {DRILL_KEY}"}, timeout=10)
    return [model["id"] for model in response.json()["data"] if "parent" not in model]


def test_a_new_model_whose_build_fails_is_taken_back_and_the_rest_keeps_serving(gateway):
    """Only a model's builder reads its checkpoint, so the ingress applies the edit as submitted
    and takes the failed model back once Serve reports the failed build."""
    config = serve_config(max_tokens_cap=300)
    broken = {"id": "tiny-chat-c", "path": "/nonexistent", "engine": {"max_model_len": 2048}}
    app = {
        "name": "model-tiny-chat-c",
        "route_prefix": None,  # Serve's default is "/", the ingress's
        "import_path": MODEL_IMPORT_PATH,
        "args": broken,
    }
    config["applications"].append(app)
    serve_deploy(config, gateway)

    def status() -> Any:
        return serve.status().applications[app["name"]]

    wait_for(lambda: status().status == ApplicationStatus.DEPLOY_FAILED, "the failed build")
    message = status().message
    assert "path" in message and "/nonexistent" in message, message
    wait_for(lambda: served_models() == [MODEL, OTHER], "the failed model taken back", limit_s=10)
    assert chat(max_tokens=400).status_code == 400, "the rest of the edit (a lower cap) stays in force"
    assert chat().status_code == 200
    serve_deploy(serve_config(), gateway)
    wait_for(lambda: app["name"] not in serve.status().applications, "the failed application deleted")
    wait_for(lambda: chat(max_tokens=400).status_code == 200, "the cap restored")


def test_an_engine_setting_change_rolls_that_models_replicas_only_without_losing_a_request(gateway):
    before = {p.pid for p in replica_processes()}
    rolled_app = {p.pid for p in replica_processes(f"ServeReplica:{deployment_name(MODEL)}:")}
    untouched = engine_and_gateway_pids() - rolled_app  # the other model's replica, the gateway
    running = drill(streams=4)
    wait_for_completions(running, 4)
    serve_deploy(serve_config(max_num_seqs=ROLLED_MAX_NUM_SEQS), gateway)
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    samples = []
    while not (before.isdisjoint({p.pid for p in replica_processes()}) and running_replicas() == 2):
        assert time.monotonic() < deadline, "the rolling update did not finish"
        samples.append(running_replicas())
        time.sleep(0.5)
    fewest_running = min(sample for sample in samples if sample is not None)
    wait_for_completions(running, 4)
    report = running.stop()
    assert_all_complete(report)
    assert fewest_running == 2, f"capacity dropped to {fewest_running} running replicas during the update"
    assert untouched <= engine_and_gateway_pids(), "the other model's replica or the gateway restarted"
    assert serve.status().applications[deployment_name(MODEL)].status == ApplicationStatus.RUNNING


def replica_states() -> dict[str, int]:
    status = serve.status().applications[deployment_name(MODEL)].deployments[deployment_name(MODEL)]
    return {ReplicaState(state).value: count for state, count in status.replica_states.items() if count}


def test_replica_count_and_autoscaling_bounds_apply_live_and_a_scale_down_cuts_no_stream(gateway):
    before = {p.pid for p in replica_processes()}
    others = engine_and_gateway_pids() - before  # the other model's replica, the gateway
    assert len(before) == 2
    running = drill(streams=4)
    wait_for_completions(running, 4)

    # Fixed 2 -> autoscaling 1..2: 4 streams are far below one replica's target (48), so 1.
    autoscaled = {"autoscaling": {"min_replicas": 1, "max_replicas": 2, "downscale_delay_s": 0}}
    serve_deploy(serve_config(max_num_seqs=ROLLED_MAX_NUM_SEQS, replicas=autoscaled), gateway)
    took = wait_for(lambda: running_replicas() == 1, "the scale-down to 1 replica")
    assert took < 15, f"the new bounds took {took:.1f}s"
    scaled_at = running.elapsed_s()
    wait_for(lambda: len(replica_processes()) == 1, "the stopped replica's exit", limit_s=120)
    wait_for_completions(running, 4)
    report = running.stop()
    assert_all_complete(report)
    spanning = sum(o.started_s < scaled_at < o.ended_s for o in report.outcomes)
    assert spanning >= 2, "no stream spanned the scale-down"
    survivors = {p.pid for p in replica_processes()}
    assert survivors < before, "the remaining replica was restarted"
    assert others <= engine_and_gateway_pids(), "the other model's replica or the gateway restarted"

    # A minimum raised to 2: the second replica starts at once (an engine start then takes its time).
    raised = {"autoscaling": {"min_replicas": 2, "max_replicas": 2}}
    serve_deploy(serve_config(max_num_seqs=ROLLED_MAX_NUM_SEQS, replicas=raised), gateway)
    took = wait_for(lambda: sum(replica_states().values()) == 2, "a second replica started")
    assert took < 15, f"the raised minimum took {took:.1f}s"
    wait_until_serving(2)
    assert survivors <= {p.pid for p in replica_processes()}, "the running replica was restarted"
    assert others <= engine_and_gateway_pids()


def test_rolling_an_autoscaled_model_keeps_its_replica_count(gateway):
    """Serve resets an autoscaled deployment's count to `initial_replicas` when its config
    changes; the gateway sets none, so a roll keeps the count the model had (2, above its
    minimum of 1, with a downscale delay far longer than the test)."""
    before = {p.pid for p in replica_processes()}
    assert len(before) == 2
    autoscaled = {"autoscaling": {"min_replicas": 1, "max_replicas": 2}}
    serve_deploy(serve_config(max_num_seqs=ROLLED_MAX_NUM_SEQS, replicas=autoscaled), gateway)
    time.sleep(3)  # a live change of the bounds: nothing moves
    assert {p.pid for p in replica_processes()} == before
    serve_deploy(serve_config(max_num_seqs=ROLLED_MAX_NUM_SEQS - 8, replicas=autoscaled), gateway)
    wait_for(lambda: before.isdisjoint(p.pid for p in replica_processes()), "the roll", limit_s=RECOVERY_TIMEOUT_S)
    wait_until_serving(2)
    assert replica_states() == {"RUNNING": 2}, replica_states()


def test_stopping_the_gateway_with_scripts_stop_lets_the_streams_in_flight_finish(gateway):
    """`serve shutdown` stops Serve's proxy at once and cuts every stream (measured: 4 of 4 cut
    about 2 s after it began); scripts/stop.py drains the ingress first. Last: it stops Serve."""
    running = drill(streams=4)
    wait_for_completions(running, 4)
    stop_at = running.elapsed_s()
    root = Path(__file__).parents[1]
    stop = [sys.executable, "scripts/stop.py"]
    done = subprocess.run(stop, capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    report = running.stop(timeout_s=60)
    in_flight = [o for o in report.outcomes if o.started_s < stop_at < o.ended_s]
    assert len(in_flight) >= 2, report.summary()
    assert all(o.kind == COMPLETE for o in in_flight), report.summary()
    assert "ingress drained" in done.stdout and "Serve shut down" in done.stdout, done.stdout
    with pytest.raises(ValueError):  # no controller: Serve is shut down
        ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
