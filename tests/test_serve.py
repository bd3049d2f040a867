"""serve.py against a live server on 127.0.0.1: the OpenAI client (whole and streamed replies
agree; 8 concurrent clients get what each gets alone; a seed repeats a reply), base-model
completions, stop strings, classifying a PNG or a token list, bad input -> 4xx with one line,
the API key, request-size and in-flight limits, a client that disconnects, and the CLI."""
import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

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
    assert (streamed, finish) == (GREETING_REPLY, "stop") and chunks > 1  # it did arrive piece by piece
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


def test_eight_concurrent_clients_get_what_each_gets_alone(client):
    requests = [dict(messages=[{"role": "user", "content": f"add {i} {7 - i}"}], temperature=1.0,
                     seed=100 + i, max_tokens=40) for i in range(8)]
    alone = [chat_text(client, **r) for r in requests]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda r: stream_text(client, **r)[:2], requests))
    assert together == alone
    assert len(set(alone)) > 1  # different prompts and seeds: not one reply for all


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
    stops = serve.StopStrings(["END", "xy"])
    assert stops.feed("abcE") == ("abc", False)  # "E" may begin "END"
    assert stops.feed("N") == ("", False)
    assert stops.feed("Dmore") == ("", True)
    stops = serve.StopStrings(["END"])
    assert stops.feed("aE") == ("a", False)
    assert stops.feed("x") == ("Ex", False)  # it did not
    assert stops.flush() == ""


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
    from common import load_model
    from prepare.tiny_cls import image_sequences, load_digits
    from prepare.codebook import encode_images
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
]


@pytest.mark.parametrize("path,body,status,words", BAD)
def test_bad_input_gets_a_4xx_with_one_line(live, path, body, status, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = live.http.post(path, content=content, headers={"Content-Type": "application/json"})
    message = r.json()["error"]["message"]
    assert r.status_code == status, message
    assert words in message and "\n" not in message


def test_api_key_request_size_in_flight_limit_and_disconnect(runs):
    server = LiveServer([runs["text"]], api_key="s3cret", max_request_bytes=2048, max_in_flight=1,
                        max_tokens=100_000)
    try:
        http, key = server.http, {"Authorization": "Bearer s3cret"}
        body = {"prompt": "the", "max_tokens": 5}
        assert http.post("/v1/completions", json=body).status_code == 401
        assert http.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.get("/v1/models").status_code == 401
        assert http.post("/v1/completions", json=body, headers=key).status_code == 200
        big = {"prompt": "x" * 4000, "max_tokens": 5}
        assert http.post("/v1/completions", json=big, headers=key).status_code == 413
        # a reply of 100k tokens (minutes here) holds the one slot; a second request is refused
        long = {"prompt": "the", "max_tokens": 100_000, "stream": True}
        with http.stream("POST", "/v1/completions", json=long, headers=key) as r:
            lines = r.iter_lines()
            first = next(lines)
            assert http.get("/health").json()["in_flight"] == 1, first
            busy = http.post("/v1/completions", json=body, headers=key)
            assert busy.status_code == 429 and "busy" in busy.json()["error"]["message"], [next(lines) for _ in range(5)]
        # the client has gone: its generation stops and frees the slot
        deadline = time.time() + 10
        while http.get("/health").json()["in_flight"] and time.time() < deadline:
            time.sleep(0.05)
        assert http.get("/health").json()["in_flight"] == 0
        # the same for a whole (not streamed) reply whose client gives up waiting
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json={**long, "stream": False}, headers=key, timeout=0.5)
        deadline = time.time() + 10
        while http.get("/health").json()["in_flight"] and time.time() < deadline:
            time.sleep(0.05)
        assert http.get("/health").json()["in_flight"] == 0
        assert http.post("/v1/completions", json=body, headers=key).status_code == 200
    finally:
        server.close()


def test_out_dir_repeats_and_settings_are_checked():
    assert serve.split_out_dirs(["--out_dir=a", "--port=1", "--out_dir", "b"]) == (["a", "b"], ["--port=1"])
    assert serve.host_warning("127.0.0.1", False) is None
    assert "api_key" in serve.host_warning("0.0.0.0", False)
    from common import ConfigError, load_config
    with pytest.raises(ConfigError, match="port"):
        load_config(serve.ServeConfig, ["--port=70000"])
    with pytest.raises(ConfigError, match="max_tokens"):
        load_config(serve.ServeConfig, ["--max_token=5"])


def test_command_line_serves_two_models(runs):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--out_dir={runs['chat']}",
                             "--out_dir", runs["classifier"], "--port=0", "--device=cpu"],
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
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), "--out_dir=/nonexistent/run"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 1 and bad.stderr.startswith("error:")
