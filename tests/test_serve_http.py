"""`gptedge serve` over real HTTP on loopback, driven by the official `openai` client (and httpx
for what the client hides): completions and chat, streamed and not, equal to Generator alone;
stop, seed, logprobs, usage; bad input, a full queue, disconnects, the API key, metrics."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serve_helpers import CONTEXT, chat_bundle, running_server

from gptedge.runtime import load

CHAT = [{"role": "system", "content": "w3"}, {"role": "user", "content": "w4 w5 w6"}]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return chat_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def generator(bundle):
    gen = load(bundle, backend="ort-cpu")
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def server(bundle):
    with running_server(bundle, max_batch=8, max_queue=64) as url:
        yield url


def _client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def test_completions_and_chat_match_the_generator(server, generator):
    client = _client(server)
    assert [m.id for m in client.models.list().data] == ["bundle"]
    want = generator.generate("w1 w2 w3", max_new_tokens=8, ignore_eos=True)
    got = client.completions.create(model="bundle", prompt="w1 w2 w3", max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.timings["prompt_tokens"], 8)
    chunks = list(client.completions.create(model="bundle", prompt="w1 w2 w3", max_tokens=8, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"

    reply = generator.chat(CHAT, max_new_tokens=12)
    got = client.chat.completions.create(model="bundle", messages=CHAT, max_tokens=12, temperature=0)
    assert got.choices[0].message.content == reply.text and got.choices[0].message.role == "assistant"
    assert got.choices[0].finish_reason == ("length" if reply.finish_reason == "length" else "stop")
    stream = client.chat.completions.create(model="bundle", messages=CHAT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.text
    assert chunks[-1].usage.completion_tokens == len(reply.tokens)


def test_concurrent_clients_get_their_serial_results(server, generator):
    prompts = [("w1 " * n).strip() + f" w{n + 10}" for n in (1, 9, 3, 25, 6, 14, 2, 40)]
    want = [generator.generate(p, max_new_tokens=10 + i, ignore_eos=True).text for i, p in enumerate(prompts)]
    client = _client(server)

    def ask(i: int) -> str:
        stream = client.completions.create(model="bundle", prompt=prompts[i], max_tokens=10 + i, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in stream)

    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(ask, range(len(prompts)))) == want


def test_stop_seed_and_logprobs(server, generator):
    client = _client(server)
    full = generator.generate("w7 w8", max_new_tokens=12, ignore_eos=True).text
    stop = full.split()[3]
    got = client.completions.create(model="bundle", prompt="w7 w8", max_tokens=12, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].finish_reason == "stop" and got.choices[0].text == full[:full.index(stop)]
    sampled = generator.generate("w7 w8", max_new_tokens=12, temperature=0.9, seed=7).text
    for _ in range(2):
        got = client.completions.create(model="bundle", prompt="w7 w8", max_tokens=12, temperature=0.9, seed=7)
        assert got.choices[0].text == sampled
    got = client.completions.create(model="bundle", prompt="w7 w8", max_tokens=5, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(top) == 3 and max(top.values()) == pytest.approx(chosen, abs=1e-6)  # greedy: the best
               for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))
    assert "".join(lp.tokens).strip() == got.choices[0].text.strip()


def test_bad_requests_name_the_problem(server):
    url = server + "/v1/completions"
    bad_json = httpx.post(url, content=b'{"prompt": "w1",', headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "error" in bad_json.json()
    for body, field in [({"prompt": "w1", "temperature": -1}, "temperature"), ({"prompt": "w1", "n": 2}, "n"),
                        ({"prompt": "w1", "max_tokens": "many"}, "max_tokens"), ({}, "prompt"),
                        ({"prompt": "w1", "logprobs": 9}, "logprobs"),
                        ({"prompt": "w1", "presence_penalty": 0.5}, "presence_penalty")]:
        r = httpx.post(url, json=body)
        assert r.status_code == 422 and r.json()["error"]["param"] == field, (body, r.text)
    long = httpx.post(url, json={"prompt": "w1 " * (CONTEXT + 5), "max_tokens": 4})
    assert long.status_code == 400 and f"context of {CONTEXT} tokens" in long.json()["error"]["message"]
    blank = httpx.post(url, json={"prompt": "   ", "max_tokens": 2})
    assert blank.status_code == 400 and "no tokens" in blank.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        _client(server).completions.create(model="bundle", prompt=[5, 100000], max_tokens=2)
    chat = httpx.post(server + "/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert chat.status_code == 422 and "messages.0.role" in chat.json()["error"]["param"]
    assert httpx.get(server + "/health").json()["status"] == "ok"  # the server is unharmed


def _until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_disconnect_frees_the_row(bundle):
    with running_server(bundle, max_batch=1, max_queue=16) as url:
        body = {"prompt": "w1 w2", "max_tokens": CONTEXT - 10, "temperature": 0, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
            assert next(r.iter_lines()).startswith("data: ")  # the row is running; now the client goes away
        _until(lambda: _metric(url, "gptedge_cancelled_requests_total") == 1)
        _until(lambda: httpx.get(url + "/health").json()["running"] == 0)
        first = _metric(url, "gptedge_generated_tokens_total")
        assert first < CONTEXT - 10
        # a client that stops waiting for a whole answer while its request is queued behind 6 others:
        # the request is dropped, its tokens are never generated
        body["max_tokens"] = CONTEXT // 4
        with ThreadPoolExecutor(6) as pool:
            busy = [pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=60) for _ in range(6)]
            _until(lambda: httpx.get(url + "/health").json()["queued"] == 5)
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/v1/completions", json=body, timeout=0.2)
            assert all(f.result().status_code == 200 for f in busy)
        _until(lambda: _metric(url, "gptedge_cancelled_requests_total") == 2)
        assert httpx.get(url + "/health").json() == {"status": "ok", "running": 0, "queued": 0}
        assert _metric(url, "gptedge_generated_tokens_total") == first + 6 * (CONTEXT // 4)


def test_full_queue_answers_429_with_retry_after(bundle):
    with running_server(bundle, max_batch=1, max_queue=1) as url:
        body = {"prompt": "w1", "max_tokens": CONTEXT - 10, "temperature": 0, "ignore_eos": True}
        with ThreadPoolExecutor(2) as pool:  # one request runs, one waits: the queue is full
            busy = [pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=60) for _ in range(2)]
            _until(lambda: httpx.get(url + "/health").json() == {"status": "ok", "running": 1, "queued": 1})
            refused = httpx.post(url + "/v1/completions", json=body)
            with pytest.raises(openai.RateLimitError, match="queue is full"):
                _client(url).completions.create(model="b", prompt="w1", max_tokens=2)
            assert [f.result().status_code for f in busy] == [200, 200]
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert "--max-queue" in refused.json()["error"]["message"]
        assert '{route="/v1/completions",status="429"} 2.0' in httpx.get(url + "/metrics").text


def test_api_key_guards_every_route_but_health(bundle):
    with running_server(bundle, api_key="sekret") as url:
        assert httpx.get(url + "/health").status_code == 200
        for path in ("/metrics", "/v1/models"):
            assert httpx.get(url + path).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            _client(url, "wrong").completions.create(model="b", prompt="w1", max_tokens=2)
        assert _client(url, "sekret").completions.create(model="b", prompt="w1", max_tokens=2).usage.total_tokens
        text = httpx.get(url + "/metrics", headers={"Authorization": "Bearer sekret"}).text
        for name in ("gptedge_requests_total", "gptedge_prompt_tokens_total", "gptedge_generated_tokens_total",
                     "gptedge_queue_depth", "gptedge_running_batch_size",
                     "gptedge_time_to_first_token_seconds_bucket", "gptedge_inter_token_latency_seconds_bucket"):
            assert name in text, name
        assert json.loads(httpx.get(url + "/health").text)["running"] == 0
