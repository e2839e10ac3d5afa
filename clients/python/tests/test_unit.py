"""The wire format and the error mapping, without a service."""

import struct

import cbor2
import pytest

import tuplespace
from tuplespace import errors
from tuplespace.protocol import FrameDecoder, decode_response, encode_request, pair_value


def test_request_frame_is_length_and_cbor_map():
    f = encode_request(7, "PUT", [pair_value(("user,1", "alice"))])
    (n,) = struct.unpack(">I", f[:4])
    assert n == len(f) - 4
    assert cbor2.loads(f[4:]) == {"id": 7, "op": "PUT", "args": [[["user", "1"], ["alice"]]]}
    assert cbor2.loads(encode_request(1, "STATUS", with_args=False)[4:]) == {"id": 1, "op": "STATUS"}


def test_tuples_from_text_form_or_sequence():
    assert pair_value((("a", "b"), "c,d")) == [["a", "b"], ["c", "d"]]
    with pytest.raises(TypeError):
        pair_value("a=b")
    with pytest.raises(TypeError):
        pair_value((("a", 1), "b"))


def test_decoder_splits_frames_fed_byte_by_byte():
    bodies = [cbor2.dumps({"id": i, "status": "ok", "pairs": []}) for i in range(3)]
    stream = b"".join(struct.pack(">I", len(b)) + b for b in bodies)
    d = FrameDecoder(1000)
    got = []
    for i in range(len(stream)):
        got += list(d.feed(stream[i : i + 1]))
    assert got == bodies and d.pending == 0


@pytest.mark.parametrize("n", [0, 1001])
def test_decoder_refuses_zero_and_oversized_lengths(n):
    with pytest.raises(tuplespace.ProtocolError):
        list(FrameDecoder(1000).feed(struct.pack(">I", n) + b"x"))


def test_decode_response():
    r = decode_response(cbor2.dumps({"id": 3, "status": "ok", "pairs": [[["k"], ["v", "w"]]]}))
    assert r.ok and r.pairs == [tuplespace.Pair(("k",), ("v", "w"))]
    assert r.pairs[0].text() == "k=v,w"
    r = decode_response(cbor2.dumps({"id": None, "status": "malformed", "message": "m"}))
    assert r.id is None and r.message == "m" and not r.ok
    r = decode_response(cbor2.dumps({"id": 1, "status": "ok", "rejected": [[["a"], ["b"]], "junk"]}))
    assert r.rejected == [(("a",), ("b",)), "junk"]
    for bad in [b"\xff", cbor2.dumps([1]), cbor2.dumps({"id": 1}), cbor2.dumps({"id": 1, "status": "ok", "pairs": [1]})]:
        with pytest.raises(tuplespace.ProtocolError):
            decode_response(bad)


def test_every_status_has_its_exception():
    expected = {
        "malformed": tuplespace.MalformedRequest,
        "not-implemented": tuplespace.OperatorNotImplemented,
        "forbidden": tuplespace.ForbiddenOperation,
        "too-large": tuplespace.TooLarge,
        "unavailable": tuplespace.Unavailable,
        "unknown": tuplespace.OutcomeUnknown,
    }
    for status, cls in expected.items():
        e = errors.status_error(tuplespace.Response(id=1, status=status, message="why"))
        assert type(e) is cls and e.status == status and "why" in str(e)
    e = errors.status_error(tuplespace.Response(id=1, status="new-thing"))
    assert isinstance(e, tuplespace.UnexpectedStatus) and e.status == "new-thing"


def test_every_close_code_has_its_exception():
    expected = {
        0: tuplespace.ClosedNormally,
        1: tuplespace.ServiceRefused,
        2: tuplespace.ForbiddenRole,
        3: tuplespace.FrameTooLarge,
        4: tuplespace.ShuttingDown,
        5: tuplespace.SlowReader,
    }
    for code, cls in expected.items():
        e = errors.close_error(code, "reason")
        assert type(e) is cls and e.code == code and e.name in str(e) and "reason" in str(e)
    e = errors.close_error(77, "x")
    assert isinstance(e, tuplespace.UnknownCloseCode) and e.code == 77
