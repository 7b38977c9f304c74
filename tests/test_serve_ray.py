"""Replicas on Ray Serve: two replicas of the tiny ensemble on a local Ray instance, driven by the
official openai client; a replica's process killed mid-load."""

import asyncio
import collections
import os
import signal
import socket
import time

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from se_engine.engine import Engine  # noqa: E402
from se_engine.ensemble import EnsembleSpec  # noqa: E402
from se_engine.sampling import SamplingParams  # noqa: E402
from se_engine.serve_ray import APP_NAME, ReplicaConfig, run  # noqa: E402

MODEL = "tiny-se"
ENGINE = dict(models=["tiny-random-llama", "tiny-random-qwen2"], ensemble=EnsembleSpec.weighted([0.5, 0.5]),
              method="se", gammas=[3, 1], max_batch=4, max_len=256)  # the default dtype: bf16, batch-invariant
CONFIG = ReplicaConfig(ENGINE, {"model_name": MODEL}, num_replicas=2, num_cpus=1)


def request(i: int) -> tuple[str, SamplingParams]:
    """Request i: greedy for every third, else seeded sampling at 0.8."""
    return f"ray {i}:", SamplingParams(temperature=0.0 if i % 3 == 0 else 0.8, seed=i, max_new_tokens=6)


@pytest.fixture(scope="module")
def url() -> str:
    # A busy 2-core machine starts Serve's proxy in more than Ray's 5 s (which then kills it).
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        run(CONFIG, port=port, blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


async def send_all(url: str, indices: list[int], concurrency: int = 16) -> dict[int, tuple[str, str | None]]:
    """Requests ``indices`` from ``concurrency`` clients of the openai library: i -> (text or the
    error's class name, the replica that answered)."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    pending, out = iter(indices), {}

    async def worker() -> None:
        for i in pending:
            prompt, p = request(i)
            try:
                raw = await client.completions.with_raw_response.create(
                    model=MODEL, prompt=prompt, max_tokens=p.max_new_tokens, temperature=p.temperature, seed=p.seed)
                out[i] = raw.parse().choices[0].text, raw.headers.get("x-replica")
            except openai.APIError as e:
                out[i] = type(e).__name__, None

    await asyncio.gather(*[worker() for _ in range(concurrency)])
    await client.close()
    return out


def running_replicas() -> int:
    states = serve.status().applications[APP_NAME].deployments["EngineReplica"].replica_states
    return states.get("RUNNING", 0)


def _replica_actors() -> dict[str, object]:
    prefix = f"SERVE_REPLICA::{APP_NAME}#EngineReplica#"
    return {a["name"][len(prefix):]: ray.get_actor(a["name"], namespace=a["namespace"])
            for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}


def test_replicas_share_the_load_and_answer_as_one_engine(url):
    out = asyncio.run(send_all(url, list(range(200))))
    reference = Engine(**ENGINE).generate(*zip(*[request(i) for i in range(200)]))
    assert [out[i][0] for i in range(200)] == [r.text for r in reference]
    served = collections.Counter(replica for _, replica in out.values())
    assert len(served) == 2 and min(served.values()) >= 40, served  # both replicas, neither starved


def test_a_killed_replica_is_replaced(url):
    """One replica's process is killed mid-load: the requests it held fail with a server error, every
    other request is answered, nothing hangs; Ray Serve starts a new replica, which serves."""
    before = _replica_actors()
    victim = sorted(before)[0]
    pid = ray.get(before[victim].__ray_call__.remote(lambda _: os.getpid()))

    async def load_and_kill() -> dict[int, tuple[str, str | None]]:
        task = asyncio.ensure_future(send_all(url, list(range(200, 296))))
        await asyncio.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        return await task

    out = asyncio.run(load_and_kill())
    failed = {i: text for i, (text, replica) in out.items() if replica is None}
    assert len(out) == 96 and set(failed.values()) <= {"InternalServerError", "APIConnectionError"}, failed
    deadline = time.monotonic() + 300  # a replacement loads torch and its models first
    while running_replicas() < 2 or victim in (now := _replica_actors()):
        assert time.monotonic() < deadline, f"no replacement replica: {serve.status()}"
        time.sleep(1)
    after = asyncio.run(send_all(url, list(range(296, 336)), concurrency=8))
    assert all(replica is not None for _, replica in after.values()), after
    assert {replica for _, replica in after.values()} == set(now)  # the replacement serves too
