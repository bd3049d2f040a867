"""
Serve danlu checkpoints over HTTP: an OpenAI-compatible API, and a page (serve.html) to chat,
compare two models on the same prompt, and draw a digit for a classifier to read.

    python serve.py --out_dir=weight/sft_alpaca [--out_dir=weight/tiny_cls] [--host=127.0.0.1 --port=8000]

GET / (the page), GET /health, GET /v1/models, POST /v1/chat/completions (chat models),
POST /v1/completions (any text model), POST /v1/classify (tiny_cls classifiers), and the API's
schema at GET /openapi.json. Completions stream over server-sent events with "stream": true.
Safe to leave running: it answers only to its own names (localhost, --host, --allowed_hosts:
no DNS rebinding), takes bodies only as application/json (no cross-site form posts), and
bounds what a request may cost (size, tokens, stop strings, image pixels, requests in flight).

One worker thread runs every model. Completions are continuously batched (engine.BatchDecoder):
the requests in flight decode as one batch, one token each per step, and a new one joins as
soon as its prompt is prefilled, in chunks between steps; past --batch_slots requests wait for
a slot. Each has its own KV cache slot, sampling settings and random generator, so the same
request with the same seed gives the same reply, alone or beside seven others (up to the float
rounding of a batched forward). --batching=False keeps the older way: requests take turns one
token at a time.

What a request may ask, and who may ask, is api.py. The rest stays here, longer than the house's
~500 lines: the routes, the worker that interleaves requests and the image input are one path
that a reader follows from a request to its reply.
"""
import asyncio
import base64
import binascii
import collections
import hmac
import json
import os
import queue
import resource
import secrets
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import ValidationError

from api import (MAX_STOP_CHARS, MAX_STOPS, MIN_TEMPERATURE, MIN_TOP_P, ApiError, ChatRequest, ClassifyRequest,
                 CompletionRequest, Sampling, host_allowed, host_name, is_unspecified, json_body, openapi_document,
                 parse_json, validation_message)
from classify import class_names, class_probs, class_token_ids
from data import dataset_path
from engine import (BatchDecoder, StopStrings, chat_budget, decode_stream, fit_history, load_for_inference,
                    utf8_constraint)
from images import ImageError, image_codebook, image_ids as encode_image, image_pixels, read_image
from images import token_ids as wrap_tokens
from settings import ConfigError, check_settings, cli, load_config, setting
from tokenizer import CHAT_TOKENS, StreamDecoder, dropped_note

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.html")


@dataclass
class ServeConfig:
    out_dir: str = "weight/tiny_cls"  # a run folder; repeat --out_dir=... to serve several
    host: str = "127.0.0.1"  # 0.0.0.0 opens the server to the network
    port: int = setting(8000, lo=0, hi=65535)  # 0: any free port (printed at start)
    api_key: str = ""  # empty: no key; else requests need "Authorization: Bearer <key>" (or set DANLU_API_KEY)
    device: str = "auto"
    dtype: str = "auto"
    max_tokens: int = setting(512, lo=1)  # the most a request may ask for (and what it gets by default)
    max_messages: int = setting(64, lo=1)
    max_request_bytes: int = setting(1_000_000, lo=1024)
    max_in_flight: int = setting(32, lo=1)  # requests generating or waiting; more get 429
    batching: bool = True  # decode the requests in flight as one batch (False: take turns a token each)
    batch_slots: int = setting(8, lo=1)  # requests decoding at once per model (KV cache rows); more wait
    prefill_chunk: int = setting(64, lo=1)  # prompt tokens prefilled between two decode steps
    allowed_hosts: str = ""  # names to answer to besides localhost and --host (comma-separated; *: any)

    def __post_init__(self):
        check_settings(self)


def split_out_dirs(argv: list[str]) -> tuple[list[str], list[str]]:
    """(every --out_dir value in order, the other arguments). --out_dir may repeat, which
    load_config's one-value-per-key rule does not allow, so it is taken out first."""
    out_dirs, rest, args = [], [], list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith("--out_dir="):
            out_dirs.append(arg.split("=", 1)[1])
        elif arg == "--out_dir" and args:
            out_dirs.append(args.pop(0))
        else:
            rest.append(arg)
    return out_dirs, rest


# ----------------------------------------------------------------------------- models

@dataclass
class Served:
    """One loaded checkpoint and what the API needs to know about it."""
    name: str
    out_dir: str
    model: torch.nn.Module
    tok: object
    meta: dict
    run: object
    kind: str  # "chat", "text" or "classifier"
    created: int  # the checkpoint's mtime, for /v1/models
    train_config: dict


def model_kind(meta: dict) -> str:
    if meta.get("task") == "classify":
        return "classifier"
    return "chat" if all(t in meta.get("special_tokens", {}) for t in CHAT_TOKENS) else "text"


def load_served(out_dirs: list[str], cfg: ServeConfig) -> dict[str, Served]:
    """{name: Served}; a model is named by its folder (the whole path when two folders share it)."""
    real = [os.path.realpath(d) for d in out_dirs]
    for i, out_dir in enumerate(out_dirs):  # before anything loads: a typo should not cost a minute
        if real[i] in real[:i]:
            raise ConfigError(f"--out_dir={out_dir} is given twice", "out_dir")
    served = {}
    for out_dir in out_dirs:
        model, tok, ckpt, run = load_for_inference(out_dir, cfg.device, cfg.dtype)
        name = os.path.basename(os.path.normpath(out_dir))
        if name in served:
            name = out_dir
        if name in served:
            raise ConfigError(f"--out_dir={out_dir}: another model is already named {name}", "out_dir")
        path = out_dir if os.path.isfile(out_dir) else os.path.join(out_dir, "ckpt.pt")
        created = int(os.path.getmtime(path)) if os.path.exists(path) else int(time.time())
        served[name] = Served(name, out_dir, model, tok, ckpt["tokenizer"], run,
                              model_kind(ckpt["tokenizer"]), created, ckpt.get("train_config", {}))
    return served


# ----------------------------------------------------------------------------- the worker

class Job:
    """One request's work: `steps` is an iterator the worker advances one item per turn; each
    item goes to `out`, an asyncio queue on the server's event loop."""

    def __init__(self, steps, loop):
        self.steps = steps
        self.loop = loop
        self.out = asyncio.Queue()
        self.cancelled = False  # set when the client goes away; the worker drops the job

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            self.cancelled = True


FINISHED = object()  # the last item of every job


def deliver(pairs: list) -> None:
    """On the event loop: each (job, item) to its job's queue."""
    for job, item in pairs:
        job.out.put_nowait(item)


class Worker:
    """The one thread that runs the models. Completions are continuously batched (batching on):
    each model's BatchDecoder decodes the requests in flight as one batch, one token each per
    step, new ones joining as their prompts are prefilled between steps. Other work (classifying,
    or every request with batching off) takes turns a step each, round robin: a short reply is
    not stuck behind a long one."""

    def __init__(self, max_in_flight: int, slots: int = 8, chunk: int = 64):
        self.max_in_flight, self.slots, self.chunk = max_in_flight, slots, chunk
        self.incoming = queue.Queue()
        self.in_flight = 0
        self.lock = threading.Lock()
        self.batches: dict[str, BatchDecoder] = {}  # per model name
        self.utf8 = {}  # per model name: its tokenizer's UTF-8 constraint (or None)
        threading.Thread(target=self._loop, name="danlu-worker", daemon=True).start()

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.in_flight >= self.max_in_flight:
                raise ApiError(429, f"the server is busy ({self.in_flight} requests in flight, "
                                    f"max_in_flight {self.max_in_flight}); retry in a moment")
            self.in_flight += 1
        self.incoming.put(job)

    def _end(self, job: Job, error: Exception | None = None, out: list | None = None) -> None:
        """The job is over: it leaves the count in flight, and its last items go (to out if given)."""
        if job.steps is not None:
            job.steps.close()
        with self.lock:
            self.in_flight -= 1
        items = ([] if error is None else [error]) + [FINISHED]
        if out is None:
            for item in items:
                job.put(item)
        else:
            out += [(job, item) for item in items]

    def _admit(self, job: Job, jobs: collections.deque) -> None:
        if not isinstance(job, TextJob):
            jobs.append(job)
            return
        try:
            s = job.s
            if s.name not in self.batches:
                self.batches[s.name] = BatchDecoder(s.model, self.slots, self.chunk, s.run.autocast)
                self.utf8[s.name] = utf8_constraint(s.tok, s.model.config.vocab_size, s.run.device)
            job.start(self.batches[s.name], self.utf8[s.name])
        except Exception as e:
            self._end(job, e)

    def _batch_step(self, batch: BatchDecoder) -> None:
        for row in batch.rows():
            if row.tag.cancelled:
                batch.remove(row)
                self._end(row.tag)
        if not batch.busy():
            return
        out = []  # (job, item): handed to the event loop in one call per step, not one per token
        try:
            made = batch.step()
        except Exception as e:  # the batched forward failed (a bug, out of memory): the rows in
            made = []           # it fail, requests still waiting for a slot go on
            for row in [r for r in batch.slots if r is not None]:
                batch.remove(row)
                self._end(row.tag, e, out)
        for row in batch.failed:  # its own prefill or draw failed: that request alone
            self._end(row.tag, row.error, out)
        for row, t in made:
            job = row.tag
            try:
                items, ended = job.reply.token(t)
                if not ended and row.done:  # max_tokens
                    items += job.reply.end()
            except Exception as e:  # this reply's text: fail it alone
                items, ended = [e], True
            if ended and not row.done:  # a stop string
                batch.remove(row)
            out += [(job, item) for item in items if item != ""]
            if ended or row.done:
                self._end(job, out=out)
        for loop in {job.loop for job, _ in out}:
            try:
                loop.call_soon_threadsafe(deliver, [(job, item) for job, item in out if job.loop is loop])
            except RuntimeError:  # the event loop has closed: the server is shutting down
                pass

    def _loop(self) -> None:
        jobs = collections.deque()
        while True:
            if not jobs and not any(b.busy() for b in self.batches.values()):
                self._admit(self.incoming.get(), jobs)  # idle: sleep until a request comes
            while not self.incoming.empty():
                self._admit(self.incoming.get_nowait(), jobs)
            for batch in self.batches.values():
                self._batch_step(batch)
            if not jobs:
                continue
            job = jobs.popleft()
            try:
                item = FINISHED if job.cancelled else next(job.steps, FINISHED)
            except Exception as e:  # a bug or an out-of-memory: fail this request, keep serving
                item = e
            if item is FINISHED or isinstance(item, Exception):
                self._end(job, item if isinstance(item, Exception) else None)
            else:
                job.put(item)
                jobs.append(job)


# ----------------------------------------------------------------------------- generation

@dataclass
class Finish:
    reason: str  # "stop" (a stop token or string) or "length" (max_tokens)
    completion_tokens: int
    first_token_at: float = 0.0  # time.perf_counter() on the worker: when the first token was made
    ended_at: float = 0.0


def generate_steps(s: Served, ids: list[int], req, stop_tokens: list[int]):
    """Yield the text each new token completes (one item per token, maybe ""), then a Finish.
    Runs on the worker thread; closing the iterator stops the generation."""
    generator = torch.Generator(device=s.run.device).manual_seed(req.seed)
    stops = StopStrings(req.stop_list())
    n, reason, first = 0, "length", None
    for t, piece in decode_stream(s.model, s.tok, ids, s.run, generator, req.max_tokens, req.temperature,
                                  req.top_k, req.top_p, stop_tokens):
        if t is not None:
            n, first = n + 1, first or time.perf_counter()
            if t in stop_tokens:
                reason = "stop"
                continue
        text, hit = stops.feed(piece)
        if t is None:  # the end: what the decoder and the stop-string matcher still held
            text += "" if hit else stops.flush()
        yield text
        if hit:
            reason = "stop"
            break
    yield Finish(reason, n, first or time.perf_counter(), time.perf_counter())


class Reply:
    """A completion's text from its tokens: whole characters, cut at a stop token or string,
    and the Finish that ends it; what generate_steps does, fed one token at a time."""

    def __init__(self, s: Served, req, stop_tokens: list[int]):
        self.decoder, self.stops, self.stop_tokens = StreamDecoder(s.tok), StopStrings(req.stop_list()), stop_tokens
        self.n, self.reason, self.first = 0, "length", None

    def token(self, t: int) -> tuple[list, bool]:
        """(items to send, whether the reply has ended)."""
        self.n, self.first = self.n + 1, self.first or time.perf_counter()
        if t in self.stop_tokens:
            self.reason = "stop"
            return self.end(), True
        text, hit = self.stops.feed(self.decoder.feed(t))
        if hit:
            self.reason = "stop"
            return [text, self.finish()], True
        return [text], False

    def end(self) -> list:
        """The last text (what the decoder and the stop-string matcher held) and the Finish."""
        text, hit = self.stops.feed(self.decoder.flush())
        if hit:
            self.reason = "stop"
        return [text + ("" if hit else self.stops.flush()), self.finish()]

    def finish(self) -> Finish:
        return Finish(self.reason, self.n, self.first or time.perf_counter(), time.perf_counter())


class TextJob(Job):
    """A completion that the worker runs in its model's BatchDecoder."""

    def __init__(self, s: Served, ids: list[int], req, stop_tokens: list[int], loop):
        super().__init__(None, loop)
        self.s, self.ids, self.req, self.stop_tokens = s, ids, req, stop_tokens
        self.reply = Reply(s, req, stop_tokens)

    def start(self, batch: BatchDecoder, constraint) -> None:
        req = self.req
        generator = torch.Generator(device=self.s.run.device).manual_seed(req.seed)
        batch.add(self.ids, req.max_tokens, req.temperature, req.top_k or None, req.top_p, generator,
                  self.stop_tokens, constraint, tag=self)


def classify_steps(s: Served, ids: list[int]):
    """One item: the class probabilities at the <CLS> position of ids."""
    x = torch.tensor([ids], dtype=torch.long, device=s.run.device)
    with s.run.autocast:
        probs = class_probs(s.model, x, s.meta["special_tokens"][s.meta["cls_token"]],
                            class_token_ids(s.meta))
    yield probs[0].float().cpu().tolist()


# ----------------------------------------------------------------------------- images

MAX_IMAGE_SIDE = 4096  # at most MAX_IMAGE_SIDE ** 2 pixels: 64 MB as RGBA


def png_size(raw: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's header: the IHDR chunk, always first, read before anything
    is decoded (a 200 KB PNG of one colour can hold 12000x12000 pixels, 432 MB decoded)."""
    if not raw.startswith(b"\x89PNG\r\n\x1a\n") or raw[12:16] != b"IHDR" or len(raw) < 24:
        raise ApiError(400, "image: not a PNG file; send a PNG")
    return struct.unpack(">II", raw[16:24])


def decode_png(text: str):
    """A base64 PNG (or data: URL) -> a PIL image; what is wrong with it is a 4xx."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image: not valid base64") from None
    width, height = png_size(raw)
    if width * height > MAX_IMAGE_SIDE ** 2:
        raise ApiError(413, f"image: {width}x{height} is too large "
                            f"(at most {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE})")
    try:
        return read_image(raw)
    except ImageError as e:
        raise ApiError(413 if "too large" in str(e) else 400, f"image: {e}") from None


def image_input(s: Served, text: str) -> tuple[list[int], list[list[int]]]:
    """(token ids <IMG> codes </IMG> <CLS>, the grid the model saw, in levels of max_value),
    through the functions that prepared its training images. Slow for a large image: the
    server calls it off the event loop."""
    try:
        book = image_codebook(s.meta, dataset_path(s.train_config.get("dataset", "")))
        pixels = image_pixels(decode_png(text), book)
        return encode_image(s.tok, book, pixels, s.model.config.block_size), pixels.astype(int).tolist()
    except ValueError as e:
        raise ApiError(400, f"{s.name}: {e}") from None


def token_input(s: Served, tokens: list) -> list[int]:
    """Ids or names of an image's tokens -> <IMG> codes </IMG> <CLS>, as training saw them."""
    try:
        return wrap_tokens(s.tok, tokens, s.model.config.block_size)
    except ValueError as e:
        raise ApiError(400, str(e)) from None


# ----------------------------------------------------------------------------- the app

def memory() -> dict:
    """Resident memory of this process (and CUDA's allocator), in MB."""
    out = {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        with open("/proc/self/statm") as f:
            out["rss_mb"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        pass  # not Linux: the peak from getrusage has to do
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_allocated_mb"] = torch.cuda.memory_allocated() / 2 ** 20
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return {k: round(v, 1) for k, v in out.items()}


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class Completion:
    """One completion request's response, in OpenAI's chat or text shape, whole or streamed."""

    def __init__(self, job: Job, request, req: Sampling, s: Served, prompt_tokens: int, chat: bool,
                 t0: float, warnings: list[str]):
        self.job, self.request, self.req, self.s, self.chat = job, request, req, s, chat
        self.prompt_tokens, self.warnings = prompt_tokens, warnings
        self.head = {"id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12),
                     "object": "chat.completion" if chat else "text_completion",
                     "created": int(time.time()), "model": s.name}
        self.t0 = t0  # when the request came in: time to first token counts the queue

    def choice(self, text: str | None, reason: str | None) -> dict:
        if self.chat:
            return {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}

    def usage(self, n: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n,
                "total_tokens": self.prompt_tokens + n}

    async def items(self):
        """Text pieces, then a Finish (logged: one line per request)."""
        async for item in job_items(self.job, self.request):
            if isinstance(item, Finish):
                self.log(item)
            yield item

    def log(self, f: Finish) -> None:
        # tokens after the first, over the time after the first: the decoding rate
        rate = (f.completion_tokens - 1) / max(f.ended_at - f.first_token_at, 1e-9)
        print(f"{self.s.name}: {self.prompt_tokens} + {f.completion_tokens} tokens, first token "
              f"{1000 * (f.first_token_at - self.t0):.0f} ms, {rate:.0f} tok/s, {f.reason}", flush=True)

    async def whole(self) -> dict:
        pieces, finish = [], Finish("stop", 0)
        async for item in self.items():
            if isinstance(item, Finish):
                finish = item
            else:
                pieces.append(item)
        text = "".join(pieces)
        body = {"index": 0, "finish_reason": finish.reason}
        body.update({"message": {"role": "assistant", "content": text}} if self.chat
                    else {"text": text, "logprobs": None})
        out = {**self.head, "choices": [body], "usage": self.usage(finish.completion_tokens)}
        return {**out, "warnings": self.warnings} if self.warnings else out

    async def events(self):
        """Server-sent events: a chunk per piece of text, one with the finish reason, the usage
        chunk when stream_options asks for it, then [DONE]."""
        chunk = {**self.head, "object": "chat.completion.chunk" if self.chat else "text_completion"}
        first = {"warnings": self.warnings} if self.warnings else {}  # in the first chunk
        if self.chat:
            yield sse({**chunk, **first, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                     "finish_reason": None}]})
        elif first:
            yield sse({**chunk, **first, "choices": [self.choice("", None)]})
        try:
            async for item in self.items():
                if isinstance(item, Finish):
                    yield sse({**chunk, "choices": [self.choice(None, item.reason)]})
                    if self.req.stream_options and self.req.stream_options.include_usage:
                        yield sse({**chunk, "choices": [], "usage": self.usage(item.completion_tokens)})
                elif item:
                    yield sse({**chunk, "choices": [self.choice(item, None)]})
        except ApiError as e:  # the 200 status line has gone out: the error travels as an event
            yield sse({"error": {"message": e.message, "type": "server_error"}})
        yield "data: [DONE]\n\n"


async def job_items(job: Job, request):
    """The job's items as the worker makes them; the job is cancelled if the client leaves."""
    getter = None  # one pending get at a time: cancelling a get that won an item would lose it
    checked = time.monotonic()
    try:
        while True:
            getter = getter or asyncio.ensure_future(job.out.get())
            done, _ = await asyncio.wait({getter}, timeout=1.0)
            if request.app.state.closing:  # Ctrl-C: end the reply here (see serve_forever)
                return
            if not done or time.monotonic() - checked > 1.0:  # each second: has the client left?
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
                if not done:
                    continue
            item, getter = getter.result(), None
            # text the worker made while this reply was being sent goes out as one event: when
            # the HTTP side falls behind the batch, it catches up instead of queueing more
            while isinstance(item, str) and not job.out.empty():
                more = job.out.get_nowait()
                if not isinstance(more, str):
                    yield item
                    item = more
                    break
                item += more
            if item is FINISHED:
                return
            if isinstance(item, Exception):
                raise ApiError(500, f"generation failed: {type(item).__name__}: {item}")
            yield item
    finally:
        job.cancelled = True  # also when a closed connection cancels the response stream
        if getter is not None:
            getter.cancel()


def make_app(served: dict[str, Served], cfg: ServeConfig):
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.requests import ClientDisconnect

    async def check_host(request: Request) -> None:
        host = request.headers.get("host", "")
        if not host_allowed(host, cfg):
            name = host_name(host)
            raise ApiError(400, f"Host {name!r} is not a name of this server (refused against DNS "
                                f"rebinding); to serve it, start serve.py with --allowed_hosts={name}")

    # no docs pages (they load scripts from a CDN); /openapi.json is what API tools read
    app = FastAPI(title="danlu", docs_url=None, redoc_url=None, dependencies=[Depends(check_host)])

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_document(app)
        return app.openapi_schema

    app.openapi = openapi
    app.state.closing = False
    worker = Worker(cfg.max_in_flight, cfg.batch_slots, cfg.prefill_chunk)
    api_key = cfg.api_key or os.environ.get("DANLU_API_KEY", "")

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        return JSONResponse({"error": {"message": e.message, "type": kind, "param": None,
                                       "code": e.status}}, status_code=e.status)

    def authorized(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return not api_key or hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

    def authorize(request: Request) -> None:
        if not authorized(request):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")

    async def read_body(request: Request) -> bytes:
        """The body, refused past max_request_bytes as it arrives (a chunked body is bounded too)."""
        limit = cfg.max_request_bytes
        too_big = ApiError(413, f"the request is larger than max_request_bytes ({limit})")
        if int(request.headers.get("content-length") or 0) > limit:
            raise too_big
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_big
        except ClientDisconnect:  # nobody is left to answer; this only ends the request quietly
            raise ApiError(400, "the client went away before the body ended") from None
        return bytes(body)

    async def read_request(request: Request, schema):
        """The body as a `schema` object, after the key, type and size checks."""
        authorize(request)
        # A form or text/plain POST is one any web page can make a visitor's browser send
        # without asking (no CORS preflight); JSON needs a preflight, which this server refuses.
        if request.headers.get("content-type", "").partition(";")[0].strip().lower() != "application/json":
            raise ApiError(415, "send the body as JSON, with the header 'Content-Type: application/json'")
        obj = parse_json(await read_body(request))
        try:
            return schema.model_validate(obj)
        except ValidationError as e:
            raise ApiError(400, validation_message(e)) from None

    def pick(name: str | None, kinds: tuple) -> Served:
        """The requested model (or the first that fits), if it does this kind of work."""
        wanted = " or ".join(kinds)
        if name is None:
            fits = [s for s in served.values() if s.kind in kinds]
            if not fits:
                raise ApiError(400, f"no {wanted} model is served here")
            return fits[0]
        if name not in served:
            raise ApiError(404, f"model {name!r} is not served here; try one of {sorted(served)}")
        if served[name].kind not in kinds:
            raise ApiError(400, f"{name} is a {served[name].kind} model; this endpoint needs a {wanted} model")
        return served[name]

    def check_sampling(req: Sampling) -> None:
        """Fill in max_tokens and seed, and hold them to the server's limits."""
        asked = req.max_tokens or req.max_completion_tokens
        if asked is not None and asked > cfg.max_tokens:
            raise ApiError(400, f"max_tokens: {asked} is more than this server allows ({cfg.max_tokens})")
        req.max_tokens = asked or cfg.max_tokens
        stops = req.stop_list()
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ApiError(400, f"stop: at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} "
                                "characters")
        if req.temperature < MIN_TEMPERATURE:
            req.temperature = 0.0
        req.top_p = max(req.top_p, MIN_TOP_P)
        if req.seed is None:
            req.seed = secrets.randbits(63)

    def submit(steps, job: Job | None = None) -> Job:
        job = job or Job(steps, asyncio.get_running_loop())
        worker.submit(job)  # before any response starts, so a busy server can still say 429
        return job

    async def respond(request, req: Sampling, s: Served, ids: list[int], stop_tokens, chat: bool, text: str):
        t0 = time.perf_counter()
        # every character sent reaches the model or is named: a char vocabulary drops the others
        warnings = [n for n in [dropped_note(s.tok, text)] if n]
        if cfg.batching:
            job = submit(None, TextJob(s, ids, req, stop_tokens, asyncio.get_running_loop()))
        else:
            job = submit(generate_steps(s, ids, req, stop_tokens))
        done = Completion(job, request, req, s, len(ids), chat, t0, warnings)
        if req.stream:
            return StreamingResponse(done.events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await done.whole()

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/health")
    async def health(request: Request):
        if not authorized(request):  # up, and a key is needed for more (what /v1/models hides)
            return {"status": "ok", "auth": True}
        return {"status": "ok", "models": list(served), "in_flight": worker.in_flight,
                "device": next(iter(served.values())).run.device, "auth": bool(api_key),
                "memory": memory()}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_entry(s, cfg) for s in served.values()]}

    @app.post("/v1/chat/completions", openapi_extra=json_body(ChatRequest))
    async def chat_completions(request: Request):
        req = await read_request(request, ChatRequest)
        s = pick(req.model, ("chat",))
        if len(req.messages) > cfg.max_messages:
            raise ApiError(400, f"messages: {len(req.messages)} messages; at most {cfg.max_messages}")
        check_sampling(req)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = chat_prompt(s, messages, req.max_tokens)
        stop_tokens = [s.tok.token_id(t) for t in CHAT_TOKENS]  # a new turn ends the reply too
        return await respond(request, req, s, ids, stop_tokens, True, "".join(m["content"] for m in messages))

    @app.post("/v1/completions", openapi_extra=json_body(CompletionRequest))
    async def completions(request: Request):
        req = await read_request(request, CompletionRequest)
        s = pick(req.model, ("text", "chat"))
        check_sampling(req)
        eot = s.tok.special_tokens.get("<|endoftext|>")
        stop_tokens = [] if eot is None else [eot]
        prompt = one_prompt(req.prompt)
        return await respond(request, req, s, text_prompt(s, prompt), stop_tokens, False, prompt)

    @app.post("/v1/classify", openapi_extra=json_body(ClassifyRequest))
    async def classify(request: Request):
        req = await read_request(request, ClassifyRequest)
        s = pick(req.model, ("classifier",))
        if (req.image is None) == (req.tokens is None):
            raise ApiError(400, "send exactly one of image (a base64 PNG) and tokens (a token list)")
        grid = None
        if req.image is not None:  # decoding a big image takes a while: not on the event loop
            ids, grid = await asyncio.to_thread(image_input, s, req.image)
        else:
            ids = token_input(s, req.tokens)
        probs = [p async for p in job_items(submit(classify_steps(s, ids)), request)][0]
        k = int(np.argmax(probs))
        out = {"model": s.name, "class": k, "class_name": class_names(s.meta)[k],
               "probabilities": [round(p, 6) for p in probs], "tokens": len(ids)}
        if grid is not None:
            out["input"] = grid  # the image as the model saw it, for the page's preview
        return out

    return app


def model_entry(s: Served, cfg: ServeConfig) -> dict:
    """An entry of GET /v1/models: OpenAI's fields, then what the page needs to know."""
    card = {"id": s.name, "object": "model", "created": s.created, "owned_by": "danlu",
            "kind": s.kind, "context": s.model.config.block_size,
            "parameters": s.model.num_params(non_embedding=False), "max_tokens": cfg.max_tokens}
    if s.kind == "classifier":
        card["classes"] = class_names(s.meta)
    return card


def chat_prompt(s: Served, messages: list[dict], max_tokens: int) -> list[int]:
    """Prompt ids for messages, trimmed to leave room for the reply exactly as sample.py --chat
    trims its history: leading system turns stay, the oldest exchanges go first."""
    n_system = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    if n_system == len(messages):
        raise ApiError(400, "messages: there is nothing after the system prompt to reply to")
    budget = chat_budget(s.model.config.block_size, max_tokens)
    return fit_history(s.tok, messages[:n_system], messages[n_system:], budget)[1]


def one_prompt(prompt) -> str:
    """/v1/completions' prompt: a string, or a list of one."""
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, "prompt: send one prompt per request (a string or a list of one)")
        prompt = prompt[0]
    return prompt


def text_prompt(s: Served, prompt: str) -> list[int]:
    """Prompt ids for /v1/completions: the last block_size - 1 tokens of the prompt."""
    ids = s.tok.encode(prompt)
    if not ids:
        if "<|endoftext|>" not in s.tok.special_tokens:
            raise ApiError(400, "prompt: empty (or no character this model knows)")
        ids = [s.tok.special_tokens["<|endoftext|>"]]
    return ids[-(s.model.config.block_size - 1):]


# ----------------------------------------------------------------------------- main

def host_warning(host: str, has_key: bool) -> str | None:
    """A warning when host opens the server to other machines."""
    if not is_unspecified(host):
        return None
    return (f"warning: --host={host} serves every network interface: anyone who can reach this "
            "machine can use the models" + ("" if has_key else "; set --api_key or DANLU_API_KEY"))


def bind(host: str, port: int) -> socket.socket:
    host = host.removeprefix("[").removesuffix("]")  # [::1], as in a URL
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port") from None
    sock.listen(2048)  # from now on connections wait in the backlog until uvicorn takes them
    return sock


def main(argv=None) -> None:
    out_dirs, rest = split_out_dirs(sys.argv[1:] if argv is None else argv)
    cfg = load_config(ServeConfig, rest + [f"--out_dir={out_dirs[0]}"] if out_dirs else rest)
    out_dirs = out_dirs or [cfg.out_dir]
    warning = host_warning(cfg.host, bool(cfg.api_key or os.environ.get("DANLU_API_KEY")))
    if warning:
        print(warning, file=sys.stderr)
    import uvicorn  # noqa: F401  (here, so that a missing uvicorn fails before the models load)
    t0 = time.time()
    served = load_served(out_dirs, cfg)
    for s in served.values():
        print(f"{s.name}: {s.kind} model from {s.out_dir}, {s.model.num_params(False) / 1e6:.2f}M "
              f"parameters, context {s.model.config.block_size}, on {s.run.device}")
    sock = bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    print(f"loaded in {time.time() - t0:.1f}s; serving on http://{host}:{port}/", flush=True)
    serve_forever(make_app(served, cfg), sock)


def serve_forever(app, sock: socket.socket) -> None:
    """Run uvicorn until Ctrl-C, which ends the replies in flight at their next token: uvicorn
    then has none left to cancel, which it would log as an error with a traceback. After it has
    shut down it raises the KeyboardInterrupt again, for cli's one line and exit 130."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.closing = True
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)).run(sockets=[sock])


if __name__ == "__main__":
    cli(main)
