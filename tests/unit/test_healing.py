"""Healing without pickle: a replica's state reaches a peer exactly, and only a peer of the same job.

Real transports on loopback (no torchft Manager, no process): one stages a state, the other fetches it.
"""

from __future__ import annotations

import math
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from contextlib import contextmanager
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save
from torch import nn

from distvision.errors import UserError
from distvision.parallel import healing
from distvision.parallel.healing import (
    HealingRefused,
    SignedHTTPTransport,
    decode_tree,
    encode_tree,
    load_secret,
    new_secret,
    signed_state,
)

SECRET = bytes.fromhex(new_secret())
OTHER_SECRET = bytes.fromhex(new_secret())
STEP = 7


@pytest.fixture
def transport():
    """make(secret, timeout): a running transport on loopback, shut down after the test."""
    made = []

    def make(secret: bytes = SECRET, timeout: float = 5.0) -> SignedHTTPTransport:
        made.append(SignedHTTPTransport(secret, timedelta(seconds=timeout)))
        return made[-1]

    yield make
    for each in made:
        each.shutdown()


@pytest.fixture
def nothing_parsed(monkeypatch):
    """Fail the test if the receiver reads a state's JSON or tensors."""

    def parsed(*args):
        raise AssertionError("the receiver parsed a state it should have refused")

    monkeypatch.setattr(healing, "decode_tree", parsed)
    monkeypatch.setattr(healing, "load_tensors", parsed)


@contextmanager
def serving(body: bytes, length: int | None = None):
    """A server that answers every GET with `body` (a peer replaying or altering a state), announced as
    `length` bytes (its own length unless given; no Content-Length when negative): its metadata."""

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            if length is None or length >= 0:
                self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/checkpoint/"
    finally:
        server.shutdown()
        server.server_close()


def realistic_state() -> tuple[dict, nn.Module]:
    """What torchft sends when a replica heals: model, two optimizers' states, and loose ends."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    for optimizer in (sgd, adam):
        model(torch.randn(5, 4)).sum().backward()
        optimizer.step()
    buffer = torch.arange(6.0)
    extras = {
        "bf16": torch.randn(3, dtype=torch.bfloat16),
        "views": [buffer[:2], buffer[2:].view(2, 2).t()],  # one buffer's views, one not contiguous
        "history": [{"epoch": 1, "loss": math.nan}, {"epoch": 2, "loss": math.inf, "lr": -math.inf}],
        7: ("seven", None, True, 2.5, -0.0, 10**30),
        (1, "a"): "a tuple key",
        None: "a None key",
    }
    state = {"user": {"model": model.state_dict(), "sgd": sgd.state_dict(), "adam": adam.state_dict(),
                      "extras": extras},
             "torchft": {"step": STEP, "batches_committed": 21}}
    return state, model


def assert_same(received, sent, where="state") -> None:
    """Equal, and of the same types all the way down (an int key stays an int, a tuple a tuple)."""
    assert type(received) is type(sent), f"{where}: {type(received).__name__} != {type(sent).__name__}"
    if isinstance(sent, torch.Tensor):
        torch.testing.assert_close(received, sent, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(sent, float):
        assert (math.isnan(received) and math.isnan(sent)) or (
            received == sent and math.copysign(1, received) == math.copysign(1, sent)), where
    elif isinstance(sent, dict):
        assert [(type(key), key) for key in received] == [(type(key), key) for key in sent], where
        for key in sent:
            assert_same(received[key], sent[key], f"{where}[{key!r}]")
    elif isinstance(sent, (list, tuple)):
        assert len(received) == len(sent), where
        for index, (got, expected) in enumerate(zip(received, sent)):
            assert_same(got, expected, f"{where}[{index}]")
    else:
        assert received == sent, where


def test_a_peer_receives_the_state_exactly_as_it_was_staged(transport):
    sender, receiver = transport(), transport()
    state, model = realistic_state()
    sent = encode_and_decode(state)  # a snapshot, to compare with after the sender trains on
    sender.send_checkpoint(dst_ranks=[1], step=STEP, state_dict=state, timeout=timedelta(seconds=5))
    with torch.no_grad():  # the sender trains on while the peer downloads: the staged copy must not move
        for parameter in model.parameters():
            parameter.add_(1.0)

    received = receiver.recv_checkpoint(src_rank=0, metadata=sender.metadata(), step=STEP,
                                        timeout=timedelta(seconds=5))

    assert_same(received, sent)
    assert sender.metadata().startswith("http://127.0.0.1:")
    fresh = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))  # and torch takes it as it would a pickled one
    fresh.load_state_dict(received["user"]["model"])
    torch.optim.Adam(fresh.parameters(), lr=1e-3).load_state_dict(received["user"]["adam"])
    assert received["user"]["adam"]["param_groups"][0]["betas"] == (0.9, 0.99)


def encode_and_decode(tree):
    document, tensors = encode_tree(tree)
    return decode_tree(document, load(save(tensors)))


def test_a_receiver_without_the_jobs_secret_gets_nothing(transport, nothing_parsed):
    sender, stranger = transport(), transport(OTHER_SECRET)
    sender.send_checkpoint([1], STEP, realistic_state()[0], timedelta(seconds=5))
    with pytest.raises(HealingRefused, match="403"):
        stranger.recv_checkpoint(0, sender.metadata(), STEP, timedelta(seconds=5))


def test_a_state_signed_with_another_secret_is_refused_before_it_is_read(transport, nothing_parsed):
    forged = b"".join(signed_state(OTHER_SECRET, STEP, {"weights": torch.ones(3)}))
    with serving(forged) as rogue, pytest.raises(HealingRefused, match="signature does not match"):
        transport().recv_checkpoint(0, rogue, STEP, timedelta(seconds=5))


@pytest.mark.parametrize("announced", [10**12, -1])
def test_an_answer_larger_than_a_state_can_be_is_refused_unread(transport, announced):
    """A rogue server announcing a terabyte (or no length at all) is refused; nothing is buffered."""
    receiver = transport()
    receiver.max_state_bytes = 1 << 20
    body = b"".join(signed_state(SECRET, STEP, {"weights": torch.ones(3)}))
    with serving(body, length=announced) as rogue, pytest.raises(HealingRefused, match="length"):
        receiver.recv_checkpoint(0, rogue, STEP, timedelta(seconds=5))
    with serving(body) as honest:  # the same state with its true length heals
        assert torch.equal(receiver.recv_checkpoint(0, honest, STEP, timedelta(seconds=5))["weights"], torch.ones(3))


@pytest.mark.parametrize("where", ["json", "tensors", "header"])
def test_a_state_altered_on_the_way_is_refused(transport, nothing_parsed, where):
    signature, header, document, tensors = signed_state(SECRET, STEP, {"weights": torch.ones(3), "lr": 0.1})
    if where == "json":
        document = document.replace(b"0.1", b"9.1")
    elif where == "tensors":
        tensors = tensors[:-1] + bytes([tensors[-1] ^ 1])
    else:
        header = header[:-1] + bytes([header[-1] ^ 1])
    with serving(signature + header + document + tensors) as peer, pytest.raises(HealingRefused):
        transport().recv_checkpoint(0, peer, STEP, timedelta(seconds=5))


def test_a_client_without_the_secret_gets_403_and_not_a_byte_of_state(transport):
    sender = transport()
    marker = torch.full((64,), 12345.0)
    sender.send_checkpoint([1], STEP, {"secret weights": marker}, timedelta(seconds=5))
    url = f"{sender.metadata()}{STEP}"
    forged = {"X-Distvision-Issued": "1", "X-Distvision-Nonce": "00", "X-Distvision-Signature": "00" * 32}
    for headers in ({}, forged):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5)
        assert refused.value.code == 403
        assert refused.value.read() == b""


def signed_request(sender: SignedHTTPTransport, server: str, nonce: str) -> urllib.request.Request:
    issued = repr(time.time())
    headers = {"X-Distvision-Issued": issued, "X-Distvision-Nonce": nonce,
               "X-Distvision-Signature": healing.request_signature(SECRET, server, STEP, issued, nonce)}
    return urllib.request.Request(f"{sender.metadata()}{STEP}", headers=headers)


def test_a_signed_request_is_answered_once_and_only_by_the_server_it_names(transport):
    sender = transport()
    sender.send_checkpoint([1], STEP, {"w": torch.ones(2)}, timedelta(seconds=5))
    server = sender.metadata().split("/")[2]
    request = signed_request(sender, server, nonce="ab" * 16)
    assert urllib.request.urlopen(request, timeout=5).status == 200
    relayed = signed_request(sender, "127.0.0.1:1", nonce="cd" * 16)  # meant for a rogue replica's server
    for refused in (request, relayed):  # replayed, relayed
        with pytest.raises(urllib.error.HTTPError, match="403"):
            urllib.request.urlopen(refused, timeout=5)


def test_the_state_of_another_step_is_refused(transport, nothing_parsed, caplog):
    older = b"".join(signed_state(SECRET, STEP - 1, {"w": torch.ones(2)}))  # validly signed, but old
    refused = pytest.raises(HealingRefused, match=f"step {STEP - 1}, asked for step {STEP}")
    with serving(older) as peer, refused:
        transport().recv_checkpoint(0, peer, STEP, timedelta(seconds=5))
    [line] = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert peer.split("/")[2] in line  # names the peer's address


def test_a_sender_serves_only_the_step_it_staged_and_only_during_the_round(transport):
    sender, receiver = transport(timeout=0.3), transport()
    sender.send_checkpoint([1], STEP, {"w": torch.ones(2)}, timedelta(seconds=5))
    with pytest.raises(HealingRefused, match="409"):  # asks for a step the sender is not at
        receiver.recv_checkpoint(0, sender.metadata(), STEP + 1, timedelta(seconds=5))
    sender.disallow_checkpoint()  # the round committed: the staged copy is gone
    with pytest.raises(HealingRefused, match="409"):
        receiver.recv_checkpoint(0, sender.metadata(), STEP, timedelta(seconds=5))


@pytest.mark.parametrize("value", [{1, 2}, torch.zeros(2).to_sparse(), lambda: None, {torch.ones(1): 1},
                                   Path("/")])
def test_what_json_and_safetensors_cannot_carry_fails_at_send_time(transport, value):
    with pytest.raises(TypeError, match=r"at state\['user'\]\['odd'\]"):
        transport().send_checkpoint([1], STEP, {"user": {"odd": value}}, timedelta(seconds=5))


SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
KEYS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6)
        | st.tuples(st.integers(), st.text(max_size=3)))
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64,
                          torch.int32, torch.uint8, torch.bool])
TENSORS = st.builds(lambda shape, dtype: torch.arange(math.prod(shape)).reshape(shape).to(dtype),
                    st.lists(st.integers(0, 3), max_size=3), DTYPES)
TREES = st.recursive(SCALARS | TENSORS, lambda children: (
    st.lists(children, max_size=3) | st.lists(children, max_size=3).map(tuple)
    | st.dictionaries(KEYS, children, max_size=3)
    | st.dictionaries(KEYS, children, max_size=3).map(OrderedDict)), max_leaves=12)


@settings(max_examples=50, deadline=None)
@given(TREES)
def test_any_tree_of_supported_values_round_trips(tree):
    assert_same(encode_and_decode(tree), tree)


def test_the_secret_comes_from_a_private_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(healing.SECRET_VARIABLE, raising=False)
    secret = new_secret()
    private, shared, empty = tmp_path / "private", tmp_path / "shared", tmp_path / "empty"
    for path, text, mode in ((private, secret + "\n", 0o600), (shared, secret, 0o644), (empty, "", 0o600)):
        path.write_text(text)
        path.chmod(mode)

    assert load_secret(str(private)) == bytes.fromhex(secret)
    with pytest.raises(UserError, match="no such file|No such file"):
        load_secret(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="can be read by others .*chmod 600"):
        load_secret(str(shared))
    with pytest.raises(UserError, match="empty"):
        load_secret(str(empty))
    with pytest.raises(UserError, match="--secret-file .* DISTVISION_SECRET"):
        load_secret(None)
    monkeypatch.setenv(healing.SECRET_VARIABLE, secret)
    assert load_secret(None) == bytes.fromhex(secret)
    monkeypatch.setenv(healing.SECRET_VARIABLE, "not hex")
    with pytest.raises(UserError, match="hex digits"):
        load_secret(None)
