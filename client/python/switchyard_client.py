#!/usr/bin/env python3
"""Switchyard's gRPC client for Python (asyncio, `grpcio`).

One persistent `Inference.Session` stream carries many requests at once; each request's frames
arrive on its own `Request` object, and a running request can be cancelled or interrupted and
redirected to new instructions without opening anything new:

    import asyncio, switchyard_client as sy

    async def main():
        async with await sy.Session.open("127.0.0.1:50051") as session:
            request = await session.start(model="SmolLM2-135M-Instruct.Q4_1",
                                          messages=[("user", "hello")], max_tokens=32)
            async for frame in request:           # Accepted, Tokens, Moved, Rejected
                if isinstance(frame, sy.pb.Tokens):
                    print(frame.text, end="", flush=True)
            print(request.finished.usage)

    asyncio.run(main())

`generate()` is the one-request form (`Inference.Generate`), `list_models()` the model listing.
A request that fails raises `RequestFailed` (its gRPC code, message, the field at fault and a
`reason` such as `CONTEXT_LENGTH_EXCEEDED`: trim old turns and retry);
when the session ends (router restarted, connection lost) every request still open on it fails
with the session's status (`UNAVAILABLE` when the connection was lost, `CANCELLED` after
`close()`, `UNAUTHENTICATED` without a valid key), and `start` raises `SessionClosed`: open a
new session to go on.

The message classes are generated from the repository's `proto/` on first use (with
`grpcio-tools`, into a cache directory keyed by the protos' contents), so they always match the
router they ship with. Requirements: `pip install grpcio grpcio-tools`.

Run as a program it streams one answer: `python3 client/python/switchyard_client.py "hello"`
(`--help` for the options).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib
import json
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Iterable, Optional, Sequence, Union

_INSTALL = "switchyard_client needs grpcio and grpcio-tools: pip install grpcio grpcio-tools"

try:
    import grpc
except ImportError as _missing:  # the one dependency outside the standard library
    if __name__ == "__main__":
        sys.exit(_INSTALL)
    raise ImportError(_INSTALL) from _missing

# The protos this client speaks, relative to the proto root.
_PROTOS = ("switchyard/v1/inference.proto",)


def _proto_root() -> Path:
    configured = os.environ.get("SWITCHYARD_PROTO_DIR")
    if configured:
        return Path(configured)
    # client/python/ -> the repository's proto/.
    return Path(__file__).resolve().parent.parent.parent / "proto"


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "switchyard" / "python-stubs"


def _load_stubs():
    """Imports the generated message and service modules, generating them when missing."""
    try:
        from grpc_tools import protoc  # noqa: PLC0415 - only needed here
    except ImportError as missing:
        raise ImportError(_INSTALL) from missing

    root = _proto_root()
    digest = hashlib.sha256(grpc.__version__.encode())
    for name in _PROTOS:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: set SWITCHYARD_PROTO_DIR to the repository's proto/ directory"
            )
        digest.update(name.encode() + b"\0" + path.read_bytes())
    out = _cache_root() / digest.hexdigest()[:16]
    if not (out / "switchyard" / "v1" / "inference_pb2_grpc.py").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        # Generated into a fresh directory, then renamed into place: a concurrent first use
        # never imports half-written modules.
        staging = Path(tempfile.mkdtemp(dir=out.parent))
        include = Path(protoc.__file__).parent / "_proto"
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{root}",
                f"-I{include}",
                f"--python_out={staging}",
                f"--grpc_python_out={staging}",
                *(str(root / name) for name in _PROTOS),
            ]
        )
        if status != 0:
            raise RuntimeError(f"grpc_tools.protoc failed on {root} (exit {status})")
        for package in (staging / "switchyard", staging / "switchyard" / "v1"):
            (package / "__init__.py").touch()
        try:
            staging.rename(out)
        except OSError:
            if not out.is_dir():
                raise
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    return (
        importlib.import_module("switchyard.v1.inference_pb2"),
        importlib.import_module("switchyard.v1.inference_pb2_grpc"),
    )


pb, pb_grpc = _load_stubs()

_CLASSES = {
    "auto": pb.REQUEST_CLASS_AUTO,
    "latency-critical": pb.REQUEST_CLASS_LATENCY_CRITICAL,
    "cost-sensitive": pb.REQUEST_CLASS_COST_SENSITIVE,
}
_STATUS_BY_VALUE = {status.value[0]: status for status in grpc.StatusCode}

Message = Union[pb.ChatMessage, tuple, dict]


class SessionClosed(Exception):
    """The session ended; nothing more can be started or steered on it. `code` is the
    session's own status: UNAVAILABLE when the connection was lost, CANCELLED after `close()`,
    or the router's refusal of the session (UNAUTHENTICATED for a missing or unknown key)."""

    def __init__(self, code: grpc.StatusCode, why: str):
        super().__init__(f"{code.name}: {why}")
        self.code = code
        self.why = why


class ProtocolError(Exception):
    """The router broke the stream's contract (e.g. a token chunk went missing)."""


class RequestFailed(Exception):
    """A request ended with a `Failed` frame (or a `Generate` call with an error status)."""

    def __init__(
        self,
        request_id: str,
        code: grpc.StatusCode,
        message: str,
        field: str = "",
        retry_after_ms: int = 0,
        reason: str = "",
    ):
        # The router's messages name the field at fault already ("model: ...").
        super().__init__(f"request {request_id!r} failed: {code.name}: {message}")
        self.request_id = request_id
        self.code = code
        self.message = message
        self.field = field
        self.retry_after_ms = retry_after_ms
        self.reason = reason

    @classmethod
    def from_frame(cls, failed) -> "RequestFailed":
        code = _STATUS_BY_VALUE.get(failed.code, grpc.StatusCode.UNKNOWN)
        return cls(
            failed.request_id,
            code,
            failed.message,
            failed.field,
            failed.retry_after_ms,
            failed.reason,
        )


@dataclass
class Completion:
    """Everything a request produced, read to its end."""

    accepted: object = None
    text: str = ""
    token_ids: list = field(default_factory=list)
    # The tools the model called, whole: `ToolCall` messages (id, name, arguments as JSON text).
    tool_calls: list = field(default_factory=list)
    finished: object = None
    moved: list = field(default_factory=list)
    # Frames for this request the router refused (a bad interrupt): the request went on.
    rejected: list = field(default_factory=list)
    # An embedding request's vector (`embed=True`), unit length; empty otherwise.
    embedding: list = field(default_factory=list)


def chat_messages(messages: Iterable[Message]) -> list:
    """`ChatMessage`s from messages given as messages, `(role, content)` pairs or dicts."""
    out = []
    for message in messages:
        if isinstance(message, pb.ChatMessage):
            out.append(message)
        elif isinstance(message, dict):
            # OpenAI's form too: content may be None on a turn that only called tools.
            calls = [
                pb.ToolCall(
                    id=call["id"],
                    name=call["function"]["name"] if "function" in call else call["name"],
                    arguments=(call["function"] if "function" in call else call)["arguments"],
                )
                for call in message.get("tool_calls") or ()
            ]
            out.append(
                pb.ChatMessage(
                    role=message["role"],
                    content=message.get("content") or "",
                    tool_calls=calls,
                    tool_call_id=message.get("tool_call_id", ""),
                )
            )
        else:
            role, content = message
            out.append(pb.ChatMessage(role=role, content=content))
    return out


def tools_of(tools: Iterable) -> list:
    """`Tool`s from tools given as messages or dicts, in OpenAI's form
    (`{"type": "function", "function": {"name", "description", "parameters"}}`) or flat
    (`{"name", "description", "parameters"}`)."""
    out = []
    for tool in tools:
        if isinstance(tool, pb.Tool):
            out.append(tool)
            continue
        function = tool.get("function", tool)
        parameters = function.get("parameters")
        out.append(
            pb.Tool(
                name=function["name"],
                description=function.get("description") or "",
                parameters_json=json.dumps(parameters) if parameters is not None else "",
            )
        )
    return out


def tool_choice_of(choice, single_call: bool = False):
    """A `ToolChoice` from OpenAI's forms: "auto", "none", "required" or a tool's name."""
    modes = {
        "auto": pb.TOOL_CHOICE_MODE_AUTO,
        "none": pb.TOOL_CHOICE_MODE_NONE,
        "required": pb.TOOL_CHOICE_MODE_REQUIRED,
    }
    if choice in modes:
        return pb.ToolChoice(mode=modes[choice], single_call=single_call)
    return pb.ToolChoice(function=choice, single_call=single_call)


def generate_request(
    *,
    model: str,
    messages: Optional[Iterable[Message]] = None,
    prompt: str = "",
    prompt_token_ids: Sequence[int] = (),
    max_tokens: int = 0,
    request_class: str = "auto",
    request_id: str = "",
    ttft_slo_ms: int = 0,
    affinity_key: str = "",
    metadata: Optional[dict] = None,
    stop: Sequence[str] = (),
    tools: Iterable = (),
    tool_choice: Optional[str] = None,
    single_call: bool = False,
    embed: bool = False,
    **sampling,
):
    """A `GenerateRequest`: `messages`, a text `prompt` or `prompt_token_ids` (ids of the
    model's tokenizer). `max_tokens` 0 (the default) takes the router's default bound.
    `sampling` takes `SamplingParams`' other fields by name
    (temperature, top_p, top_k, min_p, seed, presence_penalty, ..., logit_bias, logprobs).
    `tools` and `tool_choice` ("auto", "none", "required" or a tool's name) offer functions
    the model may call; `single_call` allows at most one call. `embed` asks for the prompt's
    embedding instead of a generation (`Completion.embedding`; GPU workers running the model
    embed)."""
    if request_class not in _CLASSES:
        raise ValueError(
            f"request_class must be one of {', '.join(_CLASSES)}, not {request_class!r}"
        )
    choice = None
    if tool_choice is not None or single_call:
        choice = tool_choice_of(tool_choice or "auto", single_call)
    return pb.GenerateRequest(
        tools=tools_of(tools),
        tool_choice=choice,
        request_id=request_id,
        model=model,
        messages=chat_messages(messages or ()),
        prompt=prompt,
        prompt_token_ids=list(prompt_token_ids),
        sampling=pb.SamplingParams(max_tokens=max_tokens, stop=list(stop), **sampling),
        **{"class": _CLASSES[request_class]},
        ttft_slo_ms=ttft_slo_ms,
        affinity_key=affinity_key,
        metadata=metadata or {},
        embed=embed,
    )


class Request:
    """One request's frames, as they arrive. Iterate it for `Accepted`, `Tokens`, `Moved` and
    `Rejected` messages; iteration ends after `Finished` (then in `finished`) and raises
    `RequestFailed` after a `Failed`."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.accepted = None
        self.finished = None
        self._frames: asyncio.Queue = asyncio.Queue()
        self._next_seq = 0
        self._ended = False

    def _deliver(self, frame) -> None:
        self._frames.put_nowait(frame)

    def __aiter__(self) -> AsyncIterator:
        return self._iterate()

    async def _iterate(self):
        while not self._ended:
            frame = await self._frames.get()
            kind = frame.WhichOneof("frame")
            message = getattr(frame, kind)
            if kind == "failed":
                self._ended = True
                raise RequestFailed.from_frame(message)
            if kind == "finished":
                self._ended = True
                self.finished = message
                return
            if kind == "accepted":
                self.accepted = message
            elif kind == "tokens":
                if message.seq != self._next_seq:
                    self._ended = True
                    raise ProtocolError(
                        f"request {self.request_id!r}: token chunk {message.seq} arrived where "
                        f"{self._next_seq} was due"
                    )
                self._next_seq += 1
            yield message

    async def collect(self) -> Completion:
        """Reads the request to its end (raising `RequestFailed` if it fails)."""
        completion = Completion()
        async for message in self:
            if isinstance(message, pb.Tokens):
                completion.text += message.text
                completion.token_ids.extend(message.token_ids)
                for piece in message.tool_calls:
                    while len(completion.tool_calls) <= piece.index:
                        completion.tool_calls.append(pb.ToolCall())
                    call = completion.tool_calls[piece.index]
                    call.id = piece.id or call.id
                    call.name = piece.name or call.name
                    call.arguments += piece.arguments
            elif isinstance(message, pb.Moved):
                completion.moved.append(message)
            elif isinstance(message, pb.Rejected):
                completion.rejected.append(message)
        completion.accepted = self.accepted
        completion.finished = self.finished
        completion.embedding = list(self.finished.embedding) if self.finished else []
        return completion


def _credentials_metadata(api_key: Optional[str]) -> tuple:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


# A session may sit unused while its user thinks: HTTP/2 pings keep the connection from looking
# idle to the router (which closes connections silent for its idle timeout, 300 s by default)
# and find a connection that died without a word.
KEEPALIVE_S = 30.0


def channel(
    target: str, *, ca_file: Optional[str] = None, keepalive_s: float = KEEPALIVE_S
) -> grpc.aio.Channel:
    """A channel to a router: plaintext, or TLS trusting the CA certificates in `ca_file`;
    pinging every `keepalive_s` seconds, with or without calls open."""
    options = [
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if ca_file is None:
        return grpc.aio.insecure_channel(target, options=options)
    with open(ca_file, "rb") as ca:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.read())
    return grpc.aio.secure_channel(target, credentials, options=options)


class Session:
    """One `Inference.Session` stream and the requests open on it."""

    def __init__(self, call, own_channel: Optional[grpc.aio.Channel]):
        self._call = call
        self._own_channel = own_channel
        self._open: dict = {}
        self._write_lock = asyncio.Lock()
        # (code, why) once the session has ended.
        self._ended: Optional[tuple] = None
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(
        cls,
        target: Union[str, grpc.aio.Channel],
        *,
        api_key: Optional[str] = None,
        ca_file: Optional[str] = None,
        keepalive_s: float = KEEPALIVE_S,
    ) -> "Session":
        """Opens a session on `target` (an address, or a channel the caller keeps, see
        `channel()`)."""
        own = (
            channel(target, ca_file=ca_file, keepalive_s=keepalive_s)
            if isinstance(target, str)
            else None
        )
        stub = pb_grpc.InferenceStub(own or target)
        call = stub.Session(metadata=_credentials_metadata(api_key))
        # The router answers the call itself before anything is written on it: a refusal of
        # the whole session (a missing key) is then read as its own status. Written at once,
        # a frame races the refusal, and grpcio reports the race as INTERNAL ("Internal error
        # from Core") in a few percent of runs.
        await call.initial_metadata()
        return cls(call, own)

    async def __aenter__(self) -> "Session":
        return self

    async def __aexit__(self, *_exc) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._ended is not None

    async def start(self, request=None, **fields) -> Request:
        """Starts a request: a `GenerateRequest`, or `generate_request`'s arguments. Its id is
        made up when not given; an id already open on this session is refused here."""
        if request is None:
            request = generate_request(**fields)
        elif fields:
            raise TypeError("pass a GenerateRequest or its fields, not both")
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        if request.request_id in self._open:
            raise ValueError(f"request id {request.request_id!r} is already open on this session")
        self._ensure_open()
        handle = Request(request.request_id)
        self._open[request.request_id] = handle
        try:
            await self._write(pb.ClientFrame(start=request))
        except BaseException:
            self._open.pop(request.request_id, None)
            raise
        return handle

    async def cancel(self, request_id: str) -> bool:
        """Asks the router to stop a request (it ends with `Finished`, reason CANCELLED).
        `False` when the request is not open any more (it ended meanwhile): nothing is sent."""
        if request_id not in self._open:
            return False
        await self._write(pb.ClientFrame(cancel=pb.Cancel(request_id=request_id)))
        return True

    async def interrupt(
        self, request_id: str, messages: Iterable[Message], keep_generated: bool = True
    ) -> bool:
        """Stops a request's generation and continues the same request with `messages`
        appended (and, with `keep_generated`, the text and tool calls so far as the assistant's
        turn). `False` when the request is not open any more: nothing is sent."""
        if request_id not in self._open:
            return False
        interrupt = pb.Interrupt(
            request_id=request_id,
            messages=chat_messages(messages),
            keep_generated=keep_generated,
        )
        await self._write(pb.ClientFrame(interrupt=interrupt))
        return True

    async def close(self) -> None:
        """Ends the session: the router cancels what is still open on it."""
        if not self.closed:
            self._call.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        if self._own_channel is not None:
            await self._own_channel.close()

    def _ensure_open(self) -> None:
        if self._ended is not None:
            raise SessionClosed(*self._ended)

    async def _write(self, frame) -> None:
        self._ensure_open()
        # grpc.aio allows one write in flight per call.
        async with self._write_lock:
            try:
                await self._call.write(frame)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
                # The call ended under the write: the reader learns (and keeps) why.
                await asyncio.gather(self._reader, return_exceptions=True)
                raise SessionClosed(*self._ended) from error

    async def _read(self) -> None:
        # What is left open ends with the session's status: UNAVAILABLE when the connection
        # went (it may be retried on a new session), CANCELLED when this client closed it, or
        # the router's refusal of the whole session (e.g. UNAUTHENTICATED).
        code, why = grpc.StatusCode.UNAVAILABLE, "session closed by the router"
        try:
            while True:
                frame = await self._call.read()
                if frame is grpc.aio.EOF:
                    break
                self._route(frame)
        except asyncio.CancelledError:
            # grpc.aio's read raises this once the call is cancelled, i.e. by close().
            code, why = grpc.StatusCode.CANCELLED, "session closed by the client"
        except grpc.aio.AioRpcError as error:
            code, why = error.code(), f"session ended: {error.details()}"
        self._ended = (code, why)
        for request_id, handle in self._open.items():
            failed = pb.Failed(request_id=request_id, code=code.value[0], message=why)
            handle._deliver(pb.ServerFrame(failed=failed))
        self._open.clear()

    def _route(self, frame) -> None:
        message = getattr(frame, frame.WhichOneof("frame"))
        handle = self._open.get(message.request_id)
        if handle is None:
            return
        handle._deliver(frame)
        if isinstance(message, (pb.Finished, pb.Failed)):
            del self._open[message.request_id]


async def generate(
    target: Union[str, grpc.aio.Channel],
    *,
    api_key: Optional[str] = None,
    ca_file: Optional[str] = None,
    timeout: Optional[float] = None,
    **fields,
) -> Completion:
    """One request on `Inference.Generate`, read to its end. `fields` as `generate_request`'s.
    Bad input and other refusals raise `RequestFailed` with the call's status."""
    own = channel(target, ca_file=ca_file) if isinstance(target, str) else None
    request = generate_request(**fields)
    handle = Request(request.request_id or "generate")
    try:
        call = pb_grpc.InferenceStub(own or target).Generate(
            request, metadata=_credentials_metadata(api_key), timeout=timeout
        )
        try:
            async for frame in call:
                handle._deliver(frame)
                if frame.WhichOneof("frame") == "accepted":
                    handle.request_id = frame.accepted.request_id
        except grpc.aio.AioRpcError as error:
            raise RequestFailed(handle.request_id, error.code(), error.details() or "") from error
        return await handle.collect()
    finally:
        if own is not None:
            await own.close()


async def list_models(
    target: Union[str, grpc.aio.Channel],
    *,
    api_key: Optional[str] = None,
    ca_file: Optional[str] = None,
) -> dict:
    """The models the router serves now, each with the ids of its ready workers."""
    own = channel(target, ca_file=ca_file) if isinstance(target, str) else None
    try:
        answer = await pb_grpc.InferenceStub(own or target).ListModels(
            pb.ListModelsRequest(), metadata=_credentials_metadata(api_key)
        )
        return {model.id: [worker.id for worker in model.workers] for model in answer.models}
    finally:
        if own is not None:
            await own.close()


async def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description="Stream one answer from a Switchyard router.")
    parser.add_argument("prompt", help="the user message")
    parser.add_argument("--target", default="127.0.0.1:50051", help="router gRPC address")
    parser.add_argument("--model", help="model (default: the first the router serves)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--class", dest="request_class", default="auto", choices=list(_CLASSES))
    parser.add_argument("--api-key", default=os.environ.get("SWITCHYARD_API_KEY"))
    parser.add_argument("--ca-file", help="CA certificates (PEM) to trust, for a TLS router")
    args = parser.parse_args(argv)
    # What to do when nothing answers at --target (the usual first mistake: no cluster yet).
    unreachable = (
        f"no router answers at {args.target}: start a local cluster with scripts/up.sh, "
        "or pass the address of a running router with --target"
    )

    model = args.model
    if model is None:
        try:
            models = await list_models(args.target, api_key=args.api_key, ca_file=args.ca_file)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                print(f"{unreachable} ({error.details()})", file=sys.stderr)
            else:
                print(f"listing the models failed: {error.code().name}: {error.details()}",
                      file=sys.stderr)
            return 1
        served = [name for name, workers in models.items() if workers]
        if not served:
            print("the router serves no model with a ready worker", file=sys.stderr)
            return 1
        model = served[0]
    async with await Session.open(
        args.target, api_key=args.api_key, ca_file=args.ca_file
    ) as session:
        try:
            request = await session.start(
                model=model,
                messages=[("user", args.prompt)],
                max_tokens=args.max_tokens,
                request_class=args.request_class,
            )
        except SessionClosed as closed:
            if closed.code == grpc.StatusCode.UNAVAILABLE:
                print(f"{unreachable} ({closed.why})", file=sys.stderr)
            else:
                print(f"the router refused the session: {closed}", file=sys.stderr)
            return 1
        answered = False
        try:
            async for message in request:
                if isinstance(message, pb.Accepted):
                    print(
                        f"[{message.pool} worker {message.worker_id}: {message.reason}]",
                        file=sys.stderr,
                    )
                elif isinstance(message, pb.Tokens):
                    print(message.text, end="", flush=True)
                    answered = True
        except RequestFailed as failed:
            if answered:
                print()
            print(failed, file=sys.stderr)
            return 1
        print()
        usage, timings = request.finished.usage, request.finished.timings
        print(
            f"[{pb.FinishReason.Name(request.finished.reason)}: {usage.prompt_tokens} prompt + "
            f"{usage.completion_tokens} completion tokens, first token {timings.ttft_ms:.0f} ms]",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(_main(sys.argv[1:])))
    except ImportError as missing:
        # grpcio-tools missing: what to install, not a traceback.
        sys.exit(str(missing))
    except KeyboardInterrupt:
        # Ctrl-C: asyncio.run has cancelled the answer and closed the session (the router
        # cancels the request); say so instead of a traceback, with the shell's status.
        print("\n[interrupted]", file=sys.stderr)
        sys.exit(130)
