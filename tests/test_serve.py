"""serve.py against a live server on 127.0.0.1: the OpenAI client (whole and streamed replies
agree; 8 concurrent clients get what each gets alone; a seed repeats a reply), base-model
completions, stop strings, classifying a PNG or a token list, bad input -> 4xx with one line,
the API key, request-size and in-flight limits, a client that disconnects, and the CLI; what
keeps it safe to leave running: Host and Content-Type checks, /health without the key, a huge
PNG refused by its header while /health still answers, costly stop strings, Ctrl-C."""
import base64
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import engine  # noqa: E402
import serve  # noqa: E402
from conftest import ROOT  # noqa: E402
from test_sft import GREETING_REPLY, build_tiny_run  # noqa: E402
from test_tiny_cls_train import CONFIG as CLS_CONFIG, TINY as CLS_TINY  # noqa: E402


def build_classifier(work: str) -> str:
    """A briefly trained tiny_cls run in work/ (once per test session); returns its folder."""
    import train
    from prepare import tiny_cls
    out_dir = os.path.join(work, "weight", "tiny_cls")
    if not os.path.exists(os.path.join(work, "done")):
        cwd = os.getcwd()
        os.chdir(work)
        try:
            data_dir = os.path.abspath(tiny_cls.main([]))
            train.main([CLS_CONFIG, *CLS_TINY, f"--dataset={data_dir}", f"--out_dir={out_dir}"])
            open("done", "w").close()
        finally:
            os.chdir(cwd)
    return out_dir


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """{"chat", "text", "classifier"}: run folders of three tiny models."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        chat_work = tmp_path_factory.getbasetemp() / "tiny_sft_run"  # shared with test_sft.py
        chat_work.mkdir(exist_ok=True)
        build_tiny_run(chat_work)
        cls_work = tmp_path_factory.getbasetemp() / "tiny_cls_serve"
        cls_work.mkdir(exist_ok=True)
        return {"chat": str(chat_work / "weight" / "sft_char_tiny"),
                "text": str(chat_work / "weight" / "char_tiny"),
                "classifier": build_classifier(str(cls_work))}
    finally:
        torch.set_num_threads(threads)


class LiveServer:
    """serve.make_app under uvicorn on a free port of 127.0.0.1, in a thread of this process."""

    def __init__(self, out_dirs: list[str], **settings):
        self.cfg = serve.ServeConfig(device="cpu", **settings)
        app = serve.make_app(serve.load_served(out_dirs, self.cfg), self.cfg)
        sock = serve.bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        # trust_env=False: a proxy set in the environment must not see requests to localhost
        self.http = httpx.Client(base_url=self.url, timeout=60, trust_env=False)

    def close(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def live(runs):
    server = LiveServer([runs["chat"], runs["text"], runs["classifier"]])
    yield server
    server.close()


@pytest.fixture(scope="session")
def client(live):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0,
                         http_client=httpx.Client(trust_env=False, timeout=60))


def chat_text(client, messages, **kw) -> tuple[str, str]:
    """(reply, finish_reason) of a whole (not streamed) chat completion."""
    r = client.chat.completions.create(model="sft_char_tiny", messages=messages, **kw)
    return r.choices[0].message.content, r.choices[0].finish_reason


def stream_text(client, messages, **kw) -> tuple[str, str, int]:
    """(reply, finish_reason, number of text chunks) of a streamed chat completion."""
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model="sft_char_tiny", messages=messages, stream=True, **kw):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    return "".join(pieces), finish, len(pieces)


HELLO = [{"role": "user", "content": "hello"}]


def test_models_and_health(live):
    data = live.http.get("/v1/models").json()["data"]
    assert {m["id"]: m["kind"] for m in data} == {"sft_char_tiny": "chat", "char_tiny": "text",
                                                  "tiny_cls": "classifier"}
    assert [m for m in data if m["kind"] == "classifier"][0]["classes"] == [str(k) for k in range(10)]
    health = live.http.get("/health").json()
    assert health["status"] == "ok" and health["memory"]["rss_mb"] > 0 and not health["auth"]
    assert "<canvas" in live.http.get("/").text


def test_openai_client_whole_and_streamed_replies_agree(client):
    text, finish = chat_text(client, HELLO, temperature=0)
    assert (text, finish) == (GREETING_REPLY, "stop")  # the tiny model's trained reply, ended at <|end|>
    streamed, finish, chunks = stream_text(client, HELLO, temperature=0)
    # streamed (text the worker made while a chunk was being sent may share the next chunk)
    assert (streamed, finish) == (GREETING_REPLY, "stop") and chunks >= 1
    r = client.chat.completions.create(model="sft_char_tiny", messages=HELLO, temperature=0)
    assert r.usage.completion_tokens == len(GREETING_REPLY) + 1  # the characters and <|end|>
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_usage_chunk_when_asked(live):
    body = {"messages": HELLO, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with live.http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    usage = json.loads(lines[-2])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(GREETING_REPLY) + 1


def test_characters_the_vocabulary_lacks_are_named_in_the_reply(live):
    """Every character sent reaches the model or is named: a char model drops the ones it has
    no id for, and the response says which (whole: "warnings"; streamed: the first chunk)."""
    body = {"messages": [{"role": "user", "content": "hello ☃"}], "temperature": 0, "max_tokens": 5}
    whole = live.http.post("/v1/chat/completions", json=body).json()
    assert len(whole["warnings"]) == 1 and "'☃'" in whole["warnings"][0]
    assert "warnings" not in live.http.post("/v1/chat/completions", json={**body, "messages": HELLO}).json()
    with live.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        first = json.loads(next(line[6:] for line in r.iter_lines() if line.startswith("data: ")))
    assert "'☃'" in first["warnings"][0]
    text = live.http.post("/v1/completions", json={"model": "char_tiny", "prompt": "to be ☃", "max_tokens": 3}).json()
    assert "'☃'" in text["warnings"][0]


def test_eight_concurrent_clients_get_what_each_gets_alone(client):
    requests = [dict(messages=[{"role": "user", "content": f"add {i} {7 - i}"}], temperature=1.0,
                     seed=100 + i, max_tokens=40) for i in range(8)]
    alone = [chat_text(client, **r) for r in requests]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda r: stream_text(client, **r)[:2], requests))
    assert together == alone
    assert len(set(alone)) > 1  # different prompts and seeds: not one reply for all


def test_past_the_slots_requests_wait_and_batching_off_gives_the_same_replies(runs):
    """With 2 batch slots, 6 concurrent requests all get their replies (the others wait for a
    slot); --batching=False (requests take turns a token each) gives the same replies."""
    requests = [{"model": "sft_char_tiny", "messages": [{"role": "user", "content": f"add {i} {i + 2}" * (1 + i)}],
                 "temperature": 1.0, "top_k": 10 + i, "seed": i, "max_tokens": 30} for i in range(6)]
    replies = {}
    for batching in (True, False):
        server = LiveServer([runs["chat"]], batching=batching, batch_slots=2, prefill_chunk=8)
        try:
            with ThreadPoolExecutor(6) as pool:
                got = list(pool.map(lambda r: server.http.post("/v1/chat/completions", json=r), requests))
            assert [r.status_code for r in got] == [200] * 6
            replies[batching] = [r.json()["choices"][0]["message"]["content"] for r in got]
        finally:
            server.close()
    assert replies[True] == replies[False]
    assert len(set(replies[True])) > 1


def test_same_request_and_seed_same_reply(client):
    r = dict(model="char_tiny", prompt="the sum", max_tokens=40, temperature=1.0)
    first = client.completions.create(seed=7, **r).choices[0].text
    assert client.completions.create(seed=7, **r).choices[0].text == first
    assert client.completions.create(seed=8, **r).choices[0].text != first


def test_base_model_completion_length_and_stop_strings(client):
    r = client.completions.create(model="char_tiny", prompt="the", max_tokens=20, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 20
    full = r.choices[0].text
    cut = client.completions.create(model="char_tiny", prompt="the", max_tokens=20, temperature=0, stop=[" "])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == full.split(" ")[0]
    pieces = [c.choices[0].text for c in client.completions.create(
        model="char_tiny", prompt="the", max_tokens=20, temperature=0, stop=full[5:8], stream=True)]
    assert "".join(pieces) == full[:5]


def test_stop_strings_hold_back_a_possible_start():
    stops = engine.StopStrings(["END", "xy"])
    assert stops.feed("abcE") == ("abc", False)  # "E" may begin "END"
    assert stops.feed("N") == ("", False)
    assert stops.feed("Dmore") == ("", True)
    stops = engine.StopStrings(["END"])
    assert stops.feed("aE") == ("a", False)
    assert stops.feed("x") == ("Ex", False)  # it did not
    assert stops.flush() == ""
    stops = engine.StopStrings(["aab", "b"])
    assert stops.feed("aaa") == ("a", False)  # "aa" may still begin "aab" (KMP falls back, keeps 2)
    assert stops.feed("ab") == ("a", True)  # the first to appear; nothing of "aab" is sent


def test_a_long_stop_string_costs_each_token_its_own_length():
    """A 150 KB stop string whose start the text keeps matching: held back, then found, each
    token in microseconds (re-scanning every prefix took seconds a token)."""
    stops = engine.StopStrings(["a" * 150_000 + "b"])
    t0 = time.perf_counter()
    for _ in range(500):
        assert stops.feed("aaaa") == ("", False)
        assert time.perf_counter() - t0 < 2.0, "stop-string matching is not incremental"
    assert stops.feed("b") == ("a" * 2000 + "b", False)  # not the stop string after all: all of it goes


def digit_png(image: np.ndarray, scale: int = 8, invert: bool = False) -> str:
    """An 8x8 digit (0..16 ink) as a base64 PNG: dark ink on white, or light on black."""
    from PIL import Image
    ink = np.kron(image.astype(np.float32) / 16, np.ones((scale, scale)))
    gray = ink if invert else 1 - ink
    buf = io.BytesIO()
    Image.fromarray(np.uint8(np.round(255 * gray)), mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_classify_tokens_match_the_model_and_a_png_gets_a_class(live, runs):
    pytest.importorskip("PIL")
    from classify import class_probs, class_token_ids
    from checkpoint import load_model
    from prepare.tiny_cls import image_sequences, load_digits
    from images import encode_images
    from tokenizer import from_meta
    images, labels = load_digits()
    model, ckpt = load_model(runs["classifier"])
    meta, tok = ckpt["tokenizer"], from_meta(ckpt["tokenizer"])
    seq = image_sequences(encode_images(images[:1], meta["codebook"]), labels[:1], tok)[0][:-2]  # up to <CLS>
    want = class_probs(model, torch.from_numpy(seq)[None], tok.stoi["<CLS>"], class_token_ids(meta))[0]
    for tokens in (seq.tolist(), [tok.tokens[i] for i in seq[1:-2]]):  # ids of it all; names of the codes
        r = live.http.post("/v1/classify", json={"tokens": tokens}).json()
        assert r["class"] == int(want.argmax()) and np.allclose(r["probabilities"], want.tolist(), atol=1e-5)
    r = live.http.post("/v1/classify", json={"model": "tiny_cls", "image": digit_png(images[0])}).json()
    assert 0 <= r["class"] <= 9 and abs(sum(r["probabilities"]) - 1) < 1e-4
    assert np.array(r["input"]).shape == (8, 8) and np.array(r["input"]).max() <= 16
    dark = live.http.post("/v1/classify", json={"image": "data:image/png;base64," + digit_png(images[0], invert=True)})
    assert dark.json()["input"] == r["input"]  # light ink on black reads as the same digit


BAD = [
    ("/v1/chat/completions", b'{"messages": [', 400, "not valid JSON"),
    ("/v1/chat/completions", b'[1, 2]', 400, "JSON object"),
    ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"messages": HELLO, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": HELLO, "temperature": 3}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 10 ** 6}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": HELLO * 65}, 400, "at most 64"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "x"}]}, 400, "nothing after"),
    ("/v1/chat/completions", {"messages": HELLO, "n": 2}, 400, "n:"),
    ("/v1/chat/completions", {"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/chat/completions", {"messages": HELLO, "temprature": 1}, 400, "temprature"),
    ("/v1/chat/completions", {"messages": HELLO, "a\nb": 1}, 400, "'a\\nb'"),  # named, on one line
    ("/v1/chat/completions", {"prompt": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "nope", "messages": HELLO}, 404, "not served"),
    ("/v1/chat/completions", {"model": "char_tiny", "messages": HELLO}, 400, "text model"),
    ("/v1/completions", {"model": "tiny_cls", "prompt": "x"}, 400, "classifier model"),
    ("/v1/completions", {"model": "char_tiny", "prompt": ["a", "b"]}, 400, "one prompt"),
    ("/v1/classify", {}, 400, "exactly one"),
    ("/v1/classify", {"image": "not base64!"}, 400, "base64"),
    ("/v1/classify", {"image": base64.b64encode(b"GIF89a....").decode()}, 400, "PNG"),
    ("/v1/classify", {"tokens": [10 ** 6]}, 400, "outside"),
    ("/v1/classify", {"tokens": ["<nope>"]}, 400, "not in this vocabulary"),
    # what used to be a 500: a parser out of stack, NaN, a 5000-digit number
    ("/v1/chat/completions", b"[" * 100_000, 400, "nested too deeply"),
    ("/v1/chat/completions", b'{"messages": [], "temperature": NaN}', 400, "NaN"),
    ("/v1/chat/completions", b'{"seed": ' + b"9" * 5000 + b"}", 400, "5000 digits"),
    # wrong types
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": HELLO, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": HELLO, "seed": 1.5}, 400, "seed"),
    ("/v1/chat/completions", {"messages": HELLO, "stop": 5}, 400, "stop"),
    ("/v1/classify", {"image": 5}, 400, "image"),
    ("/v1/classify", {"tokens": "<IMG>"}, 400, "tokens"),
    # what a request may cost: every stop string is matched against every token
    ("/v1/completions", {"prompt": "the", "stop": "x" * 257}, 400, "at most 256 characters"),
    ("/v1/chat/completions", {"messages": HELLO, "stop": ["a", "x" * 150_000]}, 400, "at most 256 characters"),
]


@pytest.mark.parametrize("path,body,status,words", BAD)
def test_bad_input_gets_a_4xx_with_one_line(live, path, body, status, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = live.http.post(path, content=content, headers={"Content-Type": "application/json"})
    message = r.json()["error"]["message"]
    assert r.status_code == status, message
    assert words in message and "\n" not in message


def test_tiny_temperature_or_top_p_is_greedy_not_a_500(client):
    """In range, but below float32: 1e-40 / 5e-324 once made every probability NaN."""
    for kw in ({"temperature": 1e-30}, {"temperature": 1e-40}, {"temperature": 5e-324},
               {"temperature": 1.0, "top_p": 1e-30}, {"temperature": 1.0, "top_p": 5e-324}):
        assert chat_text(client, HELLO, **kw) == (GREETING_REPLY, "stop"), kw


def one_line_error(r, status: int, words: str) -> None:
    message = r.json()["error"]["message"]
    assert r.status_code == status and words in message and "\n" not in message, (r.status_code, message)


def test_host_and_content_type_are_checked(live):
    """DNS rebinding (a page whose own name points at 127.0.0.1) and a text/plain or form POST
    (one any page can make a browser send without a preflight) are refused."""
    for method, path in (("GET", "/health"), ("GET", "/"), ("POST", "/v1/completions")):
        r = live.http.request(method, path, headers={"Host": "rebind.example:8000"}, json={"prompt": "the"})
        one_line_error(r, 400, "--allowed_hosts=rebind.example")
    for host in ("localhost:8000", "LOCALHOST", "127.0.0.1", "[::1]:8000"):
        assert live.http.get("/health", headers={"Host": host}).status_code == 200, host
    body = json.dumps({"prompt": "the", "max_tokens": 2})
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
        r = live.http.post("/v1/completions", content=body, headers={"Content-Type": kind})
        one_line_error(r, 415, "Content-Type: application/json")
    json_utf8 = {"Content-Type": "application/json; charset=utf-8"}
    assert live.http.post("/v1/completions", content=body, headers=json_utf8).status_code == 200
    # --allowed_hosts, and on every interface any address of the machine (rebinding needs a name)
    named = serve.ServeConfig(allowed_hosts="my.box, Other.Name:80")
    assert serve.host_allowed("my.box:8000", named) and serve.host_allowed("other.name", named)
    assert not serve.host_allowed("rebind.example", named) and not serve.host_allowed("", named)
    assert serve.host_allowed("rebind.example", serve.ServeConfig(allowed_hosts="*"))
    anywhere = serve.ServeConfig(host="0.0.0.0")
    assert serve.host_allowed("192.168.1.5:8000", anywhere) and serve.host_allowed("[fe80::1]", anywhere)
    assert not serve.host_allowed("rebind.example", anywhere)
    assert not serve.host_allowed("192.168.1.5", serve.ServeConfig())


def solid_png(width: int, height: int) -> bytes:
    """A transparent RGBA PNG written row by row (PIL would hold the whole image first):
    12000x12000 is 560 KB of file and 576 MB of pixels."""
    z = zlib.compressobj(6)
    data = b"".join(z.compress(bytes(1 + 4 * width)) for _ in range(height)) + z.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def slowest_health_while(live, image: bytes):
    """(the answer to classifying image, the slowest of the /health answers asked meanwhile, s)."""
    body = {"image": base64.b64encode(image).decode()}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, live.url + "/v1/classify", json=body, trust_env=False, timeout=60)
        slowest = 0.0
        while True:
            t0 = time.perf_counter()
            assert live.http.get("/health", timeout=30).status_code == 200
            slowest = max(slowest, time.perf_counter() - t0)
            if pending.done():
                return pending.result(), slowest


def test_a_huge_png_is_refused_by_its_header_while_health_answers(live):
    """12000x12000 is refused (413) from the PNG's header, never decoded; an image in bounds is
    decoded off the event loop. Either way /health answers within a second meanwhile."""
    r, slowest = slowest_health_while(live, solid_png(12000, 12000))
    one_line_error(r, 413, "12000x12000 is too large")
    assert slowest < 1.0, f"/health took {slowest:.2f}s while the PNG was read"
    r, slowest = slowest_health_while(live, solid_png(4096, 4096))
    assert r.status_code < 500 and slowest < 1.0, (r.text, slowest)


def test_api_key_request_size_in_flight_limit_and_disconnect(runs):
    server = LiveServer([runs["text"]], api_key="s3cret", max_request_bytes=2048, max_in_flight=1,
                        max_tokens=100_000)
    try:
        http, key = server.http, {"Authorization": "Bearer s3cret"}
        body = {"prompt": "the", "max_tokens": 5}
        assert http.post("/v1/completions", json=body).status_code == 401
        assert http.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.get("/v1/models").status_code == 401
        # /health shows no more than /v1/models does without the key: only that the server is up
        for no_key in ({}, {"Authorization": "Bearer wrong"}):
            assert http.get("/health", headers=no_key).json() == {"status": "ok", "auth": True}
        assert http.get("/health", headers=key).json()["models"] == ["char_tiny"]
        assert http.post("/v1/completions", json=body, headers=key).status_code == 200
        big = {"prompt": "x" * 4000, "max_tokens": 5}
        assert http.post("/v1/completions", json=big, headers=key).status_code == 413
        # a reply of 100k tokens (minutes here) holds the one slot; a second request is refused
        long = {"prompt": "the", "max_tokens": 100_000, "stream": True}
        with http.stream("POST", "/v1/completions", json=long, headers=key) as r:
            lines = r.iter_lines()
            first = next(lines)
            assert http.get("/health", headers=key).json()["in_flight"] == 1, first
            busy = http.post("/v1/completions", json=body, headers=key)
            assert busy.status_code == 429 and "busy" in busy.json()["error"]["message"], [next(lines) for _ in range(5)]
        # the client has gone: its generation stops and frees the slot
        deadline = time.time() + 10
        while http.get("/health", headers=key).json()["in_flight"] and time.time() < deadline:
            time.sleep(0.05)
        assert http.get("/health", headers=key).json()["in_flight"] == 0
        # the same for a whole (not streamed) reply whose client gives up waiting
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json={**long, "stream": False}, headers=key, timeout=0.5)
        deadline = time.time() + 10
        while http.get("/health", headers=key).json()["in_flight"] and time.time() < deadline:
            time.sleep(0.05)
        assert http.get("/health", headers=key).json()["in_flight"] == 0
        assert http.post("/v1/completions", json=body, headers=key).status_code == 200
    finally:
        server.close()


def test_out_dir_repeats_and_settings_are_checked():
    assert serve.split_out_dirs(["--out_dir=a", "--port=1", "--out_dir", "b"]) == (["a", "b"], ["--port=1"])
    from settings import ConfigError, load_config
    with pytest.raises(ConfigError, match="--out_dir=weight/x/ is given twice"):  # before loading anything
        serve.main(["--out_dir=weight/x", "--port=0", "--out_dir=weight/x/"])
    with pytest.raises(ConfigError, match="port"):
        load_config(serve.ServeConfig, ["--port=70000"])
    with pytest.raises(ConfigError, match="max_tokens"):
        load_config(serve.ServeConfig, ["--max_token=5"])


def test_every_spelling_of_all_interfaces_gets_the_warning():
    for host in ("0.0.0.0", "::", "[::]", "0", "0.0", "0x0", "0:0:0:0:0:0:0:0", "::0", "::ffff:0.0.0.0", ""):
        assert "api_key" in serve.host_warning(host, False), host
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "192.168.1.5", "example.com"):
        assert serve.host_warning(host, False) is None, host


def test_command_line_serves_two_models(runs):
    """serve.py as a user runs it: two models; a client that goes away mid-body; Ctrl-C while a
    reply streams (exit 130, one line, no traceback in the log); a --out_dir that is not there."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--out_dir={runs['chat']}",
                             "--out_dir", runs["classifier"], "--port=0", "--device=cpu", "--max_tokens=100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "serving on" in line:
                break
        url = lines[-1].split("serving on ")[-1].strip()
        assert url.startswith("http://127.0.0.1:"), "".join(lines)
        with httpx.Client(base_url=url, trust_env=False, timeout=30) as http:
            assert http.get("/health").json()["models"] == ["sft_char_tiny", "tiny_cls"]
            # a client that sends half its body and goes away
            with socket.create_connection(("127.0.0.1", httpx.URL(url).port)) as raw:
                raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                            b"application/json\r\nContent-Length: 1000\r\n\r\n{\"messages\": [")
            assert http.get("/health").status_code == 200
            # Ctrl-C while a reply streams: it ends, and the server with it, quietly
            long = {"model": "sft_char_tiny", "prompt": "the", "max_tokens": 100_000, "stream": True}
            with http.stream("POST", "/v1/completions", json=long) as r:
                next(r.iter_lines())
                proc.send_signal(signal.SIGINT)
                rest = proc.communicate(timeout=30)[0]
    finally:
        proc.kill()
        proc.wait(timeout=10)
    log = "".join(lines) + rest
    assert proc.returncode == 130 and "Traceback" not in log and "ERROR" not in log, log
    assert rest.strip().splitlines()[-1].startswith("interrupted"), rest  # one line, no traceback
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), "--out_dir=/nonexistent/run"],
                         capture_output=True, text=True, env=env, timeout=60)
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode == 1 and len(errors) == 1 and "Traceback" not in bad.stderr, bad.stderr
