"""Healing a live replica from a peer without pickle: the state travels as JSON and safetensors, signed.

torchft's default checkpoint transport listens on every interface and unpickles what it receives, so
anyone who can reach a worker's port, or register a replica with the Lighthouse, could run code in
it. SignedHTTPTransport, which live.py gives to each replica's torchft Manager, instead

- listens on the host it is given only (loopback for a job on one machine), and advertises that host;
- answers only a request signed with the job's secret (naming this server, issued within a minute,
  used once): anyone else gets 403 and not a byte of state;
- sends tensors as safetensors and everything else as JSON, under an HMAC-SHA256 that the receiver
  checks before it parses anything, together with the step it asked for.

One state on the wire (GET /checkpoint/<step>), all integers big-endian:
    HMAC-SHA256 (32 bytes) over PAYLOAD_DOMAIN and everything after it
    header: MAGIC (8 bytes), step (int64), JSON length, safetensors length (uint64 each)
    JSON: the state's tree, each tensor replaced by its name (encode_tree); then the safetensors bytes.
"""

from __future__ import annotations

import hmac
import http.client
import json
import logging
import math
import os
import re
import secrets
import socket
import stat
import struct
import threading
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from socketserver import ThreadingTCPServer

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from distvision.errors import UserError

# torchft's Rust servers read RUST_LOG once, when torchft is first imported, and log every quorum unless
# it says otherwise; the launcher imports this module (new_secret) before live.quiet_torchft() runs.
os.environ.setdefault("RUST_LOG", "error")
from torchft.checkpointing.transport import CheckpointTransport

SECRET_VARIABLE = "DISTVISION_SECRET"  # the job's secret, hex; the live launcher sets it for its workers
MIN_SECRET_BYTES = 16
MAGIC = b"DVHEAL1\n"
HEADER = struct.Struct(">8sqQQ")  # magic, step, JSON length, safetensors length
SIGNATURE_BYTES = 32
# Distinct prefixes: a request's HMAC can never pass for a state's, nor the other way round.
PAYLOAD_DOMAIN = b"distvision heal state\n"
REQUEST_DOMAIN = b"distvision heal request\n"
REQUEST_MAX_AGE = 60.0  # seconds a signed request is honoured (the peers' clocks: one machine, or NTP)
STEP_PATH = re.compile(r"/checkpoint/(\d+)", re.ASCII)
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
DEFAULT_MAX_STATE_BYTES = 8 << 30  # the cap of a peer's answer before the owner sets one from its state
NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

logger = logging.getLogger(__name__)


class HealingRefused(RuntimeError):
    """A peer's state or answer failed authentication: torchft reports the heal as failed, and the
    replica tries again at its next quorum."""


# -- the job's secret ---------------------------------------------------------------------------------------
def new_secret() -> str:
    """A fresh per-job secret in hex (what DISTVISION_SECRET and a --secret-file hold)."""
    return secrets.token_hex(32)


def load_secret(secret_file: str | None) -> bytes:
    """The job's secret: from secret_file (hex, readable by its owner only), else from DISTVISION_SECRET."""
    if secret_file:
        path = Path(secret_file)
        try:
            mode = path.stat().st_mode
            if mode & 0o077:
                raise UserError(f"--secret-file {path} can be read by others (mode {stat.S_IMODE(mode):o}): "
                                f"run chmod 600 {path}")
            text = path.read_text()
        except OSError as error:
            raise UserError(f"cannot read --secret-file {path}: {error.strerror}") from None
        return secret_from_hex(text, f"--secret-file {path}")
    if SECRET_VARIABLE in os.environ:
        return secret_from_hex(os.environ[SECRET_VARIABLE], SECRET_VARIABLE)
    raise UserError(f"live healing needs the job's secret: give --secret-file FILE or set {SECRET_VARIABLE} "
                    "(hex digits, e.g. from: python -c 'import secrets; print(secrets.token_hex(32))')")


def secret_from_hex(text: str, source: str) -> bytes:
    """The secret written in hex in `source` (a file or a variable, named in the error)."""
    text = text.strip()
    if not text:
        raise UserError(f"{source} is empty: it must hold the job's secret in hex digits")
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise UserError(f"{source} must hold the job's secret in hex digits") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise UserError(f"{source} holds a {len(secret)}-byte secret; use at least {MIN_SECRET_BYTES} bytes "
                        f"({2 * MIN_SECRET_BYTES} hex digits)")
    return secret


# -- the state's tree as JSON and named tensors -------------------------------------------------------------
def encode_tree(tree: object) -> tuple[bytes, dict[str, torch.Tensor]]:
    """The tree as JSON, each tensor replaced by the name of its contiguous CPU copy in the returned dict.

    A list is a JSON array; every other container, a tensor and a non-finite float are an object with
    one tag, so that int keys, tuples (an optimizer's betas) and NaN come back as they were:
    {"tuple": [...]}, {"dict": [[key, value], ...]}, {"ordered_dict": ...}, {"tensor": name},
    {"float": "nan"}. Anything but dict, OrderedDict, list, tuple, tensor, str, int, float, bool and
    None raises TypeError saying where it is. (An OrderedDict's attributes, such as a module
    state_dict's _metadata, are not sent; torch's load_state_dict does without them.)
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: object, where: str, is_key: bool = False) -> object:
        kind = type(value)
        if value is None or kind in (str, bool, int):
            return value
        if kind is float:
            return value if math.isfinite(value) else {"float": repr(value)}
        if kind in (torch.Tensor, torch.nn.Parameter) and not is_key and value.layout == torch.strided:
            name = str(len(tensors))
            # A copy: the sender trains on while a peer downloads; contiguous and sharing no memory, as
            # safetensors requires (a state's tensors may be views of one buffer).
            tensors[name] = value.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            return {"tensor": name}
        if kind is tuple:
            return {"tuple": [encode(item, f"{where}[{index}]", is_key) for index, item in enumerate(value)]}
        if kind is list and not is_key:
            return [encode(item, f"{where}[{index}]") for index, item in enumerate(value)]
        if kind in (dict, OrderedDict) and not is_key:
            items = [[encode(key, f"{where} key {key!r}", is_key=True), encode(item, f"{where}[{key!r}]")]
                     for key, item in value.items()]
            return {"dict" if kind is dict else "ordered_dict": items}
        role = "a dict key" if is_key else "a value"
        raise TypeError(f"cannot send {kind.__module__}.{kind.__qualname__} as {role} at state{where} to a "
                        "healing peer: only dict, list, tuple, dense tensors, str, int, float, bool and None")

    document = json.dumps(encode(tree, ""), allow_nan=False, separators=(",", ":"))
    return document.encode(), tensors


def decode_tree(document: bytes, tensors: dict[str, torch.Tensor]) -> object:
    """The tree encode_tree wrote, with its tensors taken from `tensors`."""

    def decode(value: object) -> object:
        if isinstance(value, list):
            return [decode(item) for item in value]
        if not isinstance(value, dict):
            return value
        ((tag, content),) = value.items()
        if tag == "tensor":
            return tensors[content]
        if tag == "float":
            return NON_FINITE[content]
        if tag == "tuple":
            return tuple(decode(item) for item in content)
        if tag in ("dict", "ordered_dict"):
            pairs = ((decode(key), decode(item)) for key, item in content)
            return dict(pairs) if tag == "dict" else OrderedDict(pairs)
        raise ValueError(f"unknown tag {tag!r} in a healing state")

    return decode(json.loads(document))


# -- one signed state ---------------------------------------------------------------------------------------
def signed_state(secret: bytes, step: int, tree: object) -> list[bytes]:
    """The state of `step` on the wire (the module's docstring), in parts to be sent one after another."""
    document, tensors = encode_tree(tree)
    packed = save_tensors(tensors)
    header = HEADER.pack(MAGIC, step, len(document), len(packed))
    signature = hmac.new(secret, PAYLOAD_DOMAIN, "sha256")
    for part in (header, document, packed):
        signature.update(part)
    return [signature.digest(), header, document, packed]


def open_state(secret: bytes, body: bytes, step: int) -> object:
    """The tree in a signed state: HealingRefused unless its HMAC matches (checked before anything in it
    is read) and it is the state of `step`."""
    view = memoryview(body)
    if len(body) < SIGNATURE_BYTES + HEADER.size:
        raise HealingRefused(f"its answer is too short to be a state ({len(body)} bytes)")
    expected = hmac.new(secret, PAYLOAD_DOMAIN, "sha256")
    expected.update(view[SIGNATURE_BYTES:])
    if not hmac.compare_digest(expected.digest(), view[:SIGNATURE_BYTES]):
        raise HealingRefused("its signature does not match (another job's secret, or altered on the way)")
    magic, sent_step, document_length, packed_length = HEADER.unpack_from(view, SIGNATURE_BYTES)
    start = SIGNATURE_BYTES + HEADER.size
    if magic != MAGIC or start + document_length + packed_length != len(body):
        raise HealingRefused("its signed state is not in this version's format")
    if sent_step != step:
        raise HealingRefused(f"it sent the state of step {sent_step}, asked for step {step} (a replay?)")
    document = bytes(view[start:start + document_length])
    return decode_tree(document, load_tensors(bytes(view[start + document_length:])))


def request_signature(secret: bytes, server: str, step: int, issued: str, nonce: str) -> str:
    """What proves a request for the state of `step` comes from a replica of this job. It names the server
    (host:port, as advertised): a rogue replica a healing peer was sent to cannot relay it to a real one."""
    message = f"{server}\n{step}\n{issued}\n{nonce}".encode()
    return hmac.new(secret, REQUEST_DOMAIN + message, "sha256").hexdigest()


# -- hosts --------------------------------------------------------------------------------------------------
def reachable_host(bind_host: str) -> str:
    """The host a peer should connect to for a server bound to bind_host (a wildcard: this machine's name)."""
    return socket.gethostname() if bind_host in WILDCARD_HOSTS else bind_host


def url_host(host: str) -> str:
    """host as it goes in a URL or host:port (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


# -- the transport ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Staged:
    """A signed state, ready to serve, and its step."""

    step: int
    parts: list[bytes]


class SignedHTTPTransport(CheckpointTransport[dict]):
    """torchft's checkpoint transport for healing, without pickle: signed JSON and safetensors over HTTP,
    served on `host` only, to requests signed with the job's secret (see the module's docstring)."""

    def __init__(self, secret: bytes, timeout: timedelta, host: str = "127.0.0.1"):
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the healing secret must have at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret
        self.host = host
        self.timeout = timeout
        self._staged: Staged | None = None
        # The most a peer's answer may hold: a signed peer's state is about as big as our own (the owner
        # sets it from the shared state's size); until then, this.
        self.max_state_bytes = DEFAULT_MAX_STATE_BYTES
        self.failed_receive: Exception | None = None  # why the last recv_checkpoint failed, if it did
        self._closed = False
        self._staged_changed = threading.Condition()
        self._nonces: dict[str, float] = {}  # signed requests already answered, until they expire
        self._server = StateServer(host, self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="healing-server", daemon=True)
        self._thread.start()

    def metadata(self) -> str:
        """Where a healing peer fetches from: this server's URL, the step to be appended."""
        return f"http://{url_host(reachable_host(self.host))}:{self._server.server_address[1]}/checkpoint/"

    def send_checkpoint(self, dst_ranks: list[int], step: int, state_dict: dict, timeout: timedelta) -> None:
        """Stage a signed copy of state_dict for the peers that heal from us this round (any request
        signed with the job's secret gets it: the secret, not dst_ranks, is what admits a peer)."""
        staged = Staged(step, signed_state(self._secret, step, state_dict))
        with self._staged_changed:
            self._staged = staged
            self._staged_changed.notify_all()

    def disallow_checkpoint(self) -> None:
        """The round is over: drop the staged copy (a late request waits for the next one, or times out)."""
        with self._staged_changed:
            self._staged = None

    def recv_checkpoint(self, src_rank: int, metadata: str, step: int, timeout: timedelta) -> dict:
        """Fetch the state of `step` from the peer at `metadata`; HealingRefused unless it is signed with
        our secret and is that step's. A failure is also kept in failed_receive (torchft only logs it)."""
        try:
            return self._receive(metadata, step, timeout)
        except Exception as error:
            self.failed_receive = error
            raise

    def _receive(self, metadata: str, step: int, timeout: timedelta) -> dict:
        url = urllib.parse.urlsplit(f"{metadata}{step}")
        issued, nonce = repr(time.time()), secrets.token_hex(16)
        headers = {"X-Distvision-Issued": issued, "X-Distvision-Nonce": nonce,
                   "X-Distvision-Signature": request_signature(self._secret, url.netloc, step, issued, nonce)}
        # http.client rather than urllib: no proxy from the environment, no redirect to elsewhere.
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout.total_seconds())
        try:
            connection.request("GET", url.path, headers=headers)
            response = connection.getresponse()
            length = int(response.getheader("Content-Length") or -1)
            # Read no more than a state can be: a rogue server's endless answer is refused, not buffered.
            body = response.read(length) if response.status == 200 and 0 <= length <= self.max_state_bytes else b""
        finally:
            connection.close()
        try:
            if response.status != 200:
                hint = " (another job's secret, or clocks a minute apart)" if response.status == 403 else ""
                raise HealingRefused(f"it answered {response.status} {response.reason}{hint}")
            if not 0 <= length <= self.max_state_bytes:
                raise HealingRefused(f"its answer's length ({length} bytes) is not that of a state of at most "
                                     f"{self.max_state_bytes} bytes")
            return open_state(self._secret, body, step)
        except HealingRefused as error:
            logger.error("distvision: refused to heal from the peer at %s: %s", url.netloc, error)
            raise

    def shutdown(self, wait: bool = True) -> None:
        """Stop serving; with wait=False the server's thread ends on its own shortly after."""
        with self._staged_changed:
            self._closed, self._staged = True, None
            self._staged_changed.notify_all()
        if wait:
            self._stop_server()
        else:
            threading.Thread(target=self._stop_server, name="healing-server-stop", daemon=True).start()

    def _stop_server(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- the server's side, called by StateRequest ----------------------------------------------------------
    def authorised_step(self, path: str, headers) -> int | None:
        """The step a request asks for, if it is signed with our secret, recent, and not seen before."""
        match = STEP_PATH.fullmatch(path)
        issued, nonce, signature = (headers.get(f"X-Distvision-{name}", "") for name in
                                    ("Issued", "Nonce", "Signature"))
        if not (match and issued and nonce and signature):
            return None
        step = int(match.group(1))
        try:
            age = abs(time.time() - float(issued))
        except ValueError:
            return None
        server = urllib.parse.urlsplit(self.metadata()).netloc
        expected = request_signature(self._secret, server, step, issued, nonce).encode()
        if not (age <= REQUEST_MAX_AGE and hmac.compare_digest(expected, signature.encode("latin-1"))):
            return None
        with self._staged_changed:
            now = time.time()
            self._nonces = {seen: at for seen, at in self._nonces.items() if now - at <= REQUEST_MAX_AGE}
            if nonce in self._nonces:
                return None
            self._nonces[nonce] = now
        return step

    def staged_parts(self, step: int) -> list[bytes] | None:
        """The signed state of `step`, once staged (a peer may ask before we have staged it); None if not
        staged within the timeout, or shut down."""
        deadline = time.monotonic() + self.timeout.total_seconds()
        with self._staged_changed:
            while not self._closed and (self._staged is None or self._staged.step != step):
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._staged_changed.wait(left)
            return None if self._closed else self._staged.parts


class StateServer(ThreadingTCPServer):
    """The transport's HTTP server: a thread per request, bound to one host."""

    daemon_threads = True
    block_on_close = False  # a peer still downloading must not hold up shutdown

    def __init__(self, host: str, transport: SignedHTTPTransport):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.transport = transport
        super().__init__((host, 0), StateRequest)


class StateRequest(BaseHTTPRequestHandler):
    """GET /checkpoint/<step>, signed: the staged state of that step; unsigned: 403 and nothing else."""

    server: StateServer

    def setup(self) -> None:
        self.timeout = self.server.transport.timeout.total_seconds()  # a stalled peer does not hold a thread
        super().setup()

    def do_GET(self) -> None:
        transport = self.server.transport
        step = transport.authorised_step(self.path, self.headers)
        if step is None:
            logger.warning("distvision: refused a state request from %s: not signed with this job's secret",
                           self.client_address[0])
            self._answer_empty(403)
            return
        parts = transport.staged_parts(step)
        if parts is None:
            self._answer_empty(409)  # not serving that step
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(sum(len(part) for part in parts)))
        self.end_headers()
        for part in parts:
            self.wfile.write(part)

    def _answer_empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args) -> None:
        """Quiet: http.server would write a line per request to stderr."""
