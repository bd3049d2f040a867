"""
What the server accepts, apart from the models: the request bodies (pydantic schemas, strict:
unknown fields, wrong types and out-of-range numbers are a 4xx with one line), JSON parsed with
bounds on nesting and number size, the API's OpenAPI document, and who may ask (the Host header
against the server's own names: no DNS rebinding). serve.py builds the app on these.
"""
import ipaddress
import json
import socket
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


# ----------------------------------------------------------------------------- requests

class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Strict(BaseModel):
    # strict: "0.5" is not a number and 1 is not a string; forbid: a misspelt field is an error
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """The fields both completion endpoints share (OpenAI's names, plus top_k)."""
    model: str | None = None  # optional here: the first model that fits
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0: greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0: off
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2 ** 63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str | list[str]


class ClassifyRequest(Strict):
    model: str | None = None
    image: str | None = None  # a PNG, base64 (a data: URL is fine)
    tokens: list[int] | list[str] | None = None  # token ids or names: <IMG> <Z_..> ... [</IMG> <CLS>]


def validation_message(e: ValidationError) -> str:
    err = e.errors()[0]
    # a misspelt field is named as sent; one with a newline or the like, quoted: one line always
    where = ".".join(str(p) if str(p).isprintable() else repr(p) for p in err["loc"]) or "body"
    return f"{where}: {err['msg']}"


REQUESTS = (ChatRequest, CompletionRequest, ClassifyRequest)
MAX_STOPS, MAX_STOP_CHARS = 4, 256  # every stop string is matched against every token
# float32 sampling divides the logits by the temperature and compares the mass to top_p: below
# these (1e-40, 5e-324) the division overflows or top_p rounds to 0 and every probability is NaN.
# So small a temperature is greedy in effect, so small a top_p keeps the top token alone.
MIN_TEMPERATURE, MIN_TOP_P = 1e-6, 1e-6


def json_int(text: str) -> int:
    if len(text) > 40:  # no field is near 10^40; int() of a long one is slow (refused past 4300 digits)
        raise ValueError(f"the number {text[:12]}... has {len(text)} digits")
    return int(text)


def json_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")  # Python's json reads NaN and Infinity; JSON has neither


def parse_json(body: bytes) -> dict:
    """The body as a JSON object; what is wrong with it is a 4xx with one line."""
    try:
        obj = json.loads(body, parse_int=json_int, parse_constant=json_constant)
    except RecursionError:  # 100000 '[' in a row run the parser out of stack
        raise ApiError(400, "the body is nested too deeply") from None
    except ValueError as e:  # bad JSON or UTF-8, NaN, an endless number
        raise ApiError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "the body must be a JSON object")
    return obj


def openapi_document(app) -> dict:
    """FastAPI's document of the routes, with the request bodies' schemas added: the endpoints
    read their bodies themselves (to bound their size and answer errors in one line), so
    FastAPI does not know them; each route names its schema in openapi_extra (json_body)."""
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    _, schemas = models_json_schema([(m, "validation") for m in REQUESTS],
                                    ref_template="#/components/schemas/{model}")
    doc.setdefault("components", {}).setdefault("schemas", {}).update(schemas["$defs"])
    return doc


def json_body(schema) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{schema.__name__}"}}}}}


# ----------------------------------------------------------------------------- who may ask

LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


def host_name(value: str) -> str:
    """The host of a Host header (or an --allowed_hosts entry): lowercase, no port, no brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.partition(":")[0] if value.count(":") == 1 else value


def is_unspecified(host: str) -> bool:
    """Whether binding host listens on every interface, however it is spelt: "", 0.0.0.0, 0,
    ::, [::], 0:0:0:0:0:0:0:0, ::ffff:0.0.0.0, ..."""
    host = host.strip().removeprefix("[").removesuffix("]")
    if not host:
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        try:  # the short forms bind() takes too (inet_aton's): 0, 0.0, 0x0
            return socket.inet_aton(host) == bytes(4)
        except OSError:
            return False  # a name, such as localhost
    return addr.is_unspecified or bool(getattr(addr, "ipv4_mapped", None) and addr.ipv4_mapped.is_unspecified)


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def host_allowed(header: str, cfg) -> bool:
    """Whether to answer a request whose Host header is `header`. A page on any website can
    point its own name at 127.0.0.1 (DNS rebinding) and then read this server as its own
    origin; the browser still sends that name as Host, so only names this server goes by are
    answered: localhost, the bound address, --allowed_hosts. Rebinding needs a name, so on
    every interface (0.0.0.0) any address of this machine is fine too."""
    name = host_name(header)
    allowed = {host_name(h) for h in cfg.allowed_hosts.split(",") if h.strip()}
    if "*" in allowed or (name and name in allowed | LOCAL_NAMES | {host_name(cfg.host)}):
        return True
    return is_unspecified(cfg.host) and is_ip(name)
