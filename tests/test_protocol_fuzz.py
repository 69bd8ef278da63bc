"""Property tests of the wire protocol's parser: whatever arrives in a frame, the parser
either returns a valid ``Message`` or raises ``ProtocolError`` (the only exception the
server is prepared for), and every valid message survives ``encode`` then
``parse_message`` unchanged.

Example counts and deadlines are bounded so the whole file runs in a few seconds in CI.
"""

import json
import string

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from wrapper.protocol import (KILL_REASONS, MAX_ERROR_LENGTH, MAX_NAME_LENGTH, SERVER_TYPES,
                              STREAMS, WRAPPER_TYPES, Message, ProtocolError, encode,
                              parse_message)

FUZZ = settings(max_examples=200, deadline=500,
                suppress_health_check=[HealthCheck.too_slow])
ALL_TYPES = WRAPPER_TYPES | SERVER_TYPES

json_scalars = (st.none() | st.booleans() | st.integers() | st.text(max_size=40)
                | st.floats(allow_nan=True, allow_infinity=True))
json_values = st.recursive(
    json_scalars,
    lambda children: (st.lists(children, max_size=5)
                      | st.dictionaries(st.text(max_size=12), children, max_size=5)),
    max_leaves=12)

names = st.text(min_size=1, max_size=40)
non_negative = st.integers(min_value=0, max_value=2 ** 70)
any_int = st.integers(min_value=-2 ** 70, max_value=2 ** 70)


def check_valid(message, allowed_types):
    """What a parsed message promises to its receiver."""
    assert isinstance(message, Message)
    assert message.type in allowed_types
    if message.type in WRAPPER_TYPES:
        for name in ("job_name", "job_instance", "machine"):
            value = getattr(message, name)
            assert isinstance(value, str) and 0 < len(value) <= MAX_NAME_LENGTH
    if message.seq is not None:
        assert type(message.seq) is int and message.seq >= 0
    if message.token is not None:
        assert isinstance(message.token, str)
    if message.type == "output":
        assert message.stream in STREAMS and isinstance(message.data, str)
    if message.type == "complete":
        assert type(message.retcode) is int and isinstance(message.output, str)
    if message.type == "start" and message.pid is not None:
        assert type(message.pid) is int
    if message.type == "error":
        assert isinstance(message.error, str) and len(message.error) <= MAX_ERROR_LENGTH
    if message.type == "ack":
        assert type(message.ack) is int


def parse_or_refuse(frame, allowed_types=WRAPPER_TYPES):
    """Parse ``frame``; a ProtocolError is a fine answer, any other exception fails."""
    try:
        message = parse_message(frame, allowed_types)
    except ProtocolError as exc:
        assert str(exc)
        return None
    check_valid(message, allowed_types)
    return message


@st.composite
def valid_messages(draw, types=ALL_TYPES):
    """A valid Message of any type, with only the fields its type uses."""
    msg_type = draw(st.sampled_from(sorted(types)))
    fields = {"timestamp": draw(st.text(min_size=1, max_size=64))}
    if msg_type in WRAPPER_TYPES:
        fields.update(job_name=draw(names), job_instance=draw(names), machine=draw(names))
    fields["seq"] = draw(st.none() | non_negative)
    fields["token"] = draw(st.none() | st.text(max_size=64))
    if msg_type == "start":
        fields["pid"] = draw(st.none() | any_int)
    elif msg_type == "output":
        fields["stream"] = draw(st.sampled_from(sorted(STREAMS)))
        fields["data"] = draw(st.text(max_size=200))
    elif msg_type == "complete":
        fields["retcode"] = draw(any_int)
        fields["output"] = draw(st.text(max_size=200))
    elif msg_type == "error":
        fields["error"] = draw(st.text(max_size=200))
    elif msg_type == "kill":
        fields["reason"] = draw(st.sampled_from(sorted(KILL_REASONS)))
    elif msg_type == "ack":
        fields["ack"] = draw(non_negative)
    return Message(type=msg_type, **fields)


def mutate_object(draw, obj):
    """One structural change to a message's JSON object."""
    obj = dict(obj)
    how = draw(st.sampled_from(["drop", "retype", "add", "rename"]))
    key = draw(st.sampled_from(sorted(obj)))
    if how == "drop":
        del obj[key]
    elif how == "retype":
        obj[key] = draw(json_values)
    elif how == "add":
        obj[draw(st.text(max_size=12))] = draw(json_values)
    else:
        obj[draw(st.text(max_size=12))] = obj.pop(key)
    return obj


def mutate_text(draw, text):
    """One character-level change to a frame: insert, delete or replace a character."""
    position = draw(st.integers(min_value=0, max_value=len(text)))
    how = draw(st.sampled_from(["insert", "delete", "replace", "truncate"]))
    char = draw(st.sampled_from(list('{}[]",:\\0e-.') + [" ", "\ud800", "\x00"])
                | st.characters())
    if how == "insert":
        return text[:position] + char + text[position:]
    if how == "delete":
        return text[:position] + text[position + 1:]
    if how == "replace":
        return text[:position] + char + text[position + 1:]
    return text[:position]


# ------------------------------------------------------------------ any input at all

@FUZZ
@given(st.text(max_size=300))
@example("")
@example("null")
@example("[" * 100000)
@example('{"type":' * 50000)
@example('{"type":"output","job_name":"j","job_instance":"i","machine":"m",'
         '"stream":"stdout","data":' + "[" * 100000 + "]" * 100000 + "}")
@example('{"type":"connect","job_name":"j","job_instance":"i","machine":"m","seq":1e400}')
@example('{"type":"connect","job_name":"j","job_instance":"i","machine":"m","seq":'
         + "9" * 5000 + "}")
@example('{"type":"connect","job_name":"\\ud800","job_instance":"i","machine":"m"}')
@example('{"type":"connect","type":"kill"}')
def test_any_text_parses_or_is_refused(text):
    parse_or_refuse(text)
    parse_or_refuse(text, SERVER_TYPES)


@FUZZ
@given(json_values)
def test_any_json_value_parses_or_is_refused(value):
    frame = json.dumps(value)
    parse_or_refuse(frame)
    parse_or_refuse(frame, SERVER_TYPES)


@FUZZ
@given(st.dictionaries(st.sampled_from(["type", "job_name", "job_instance", "machine",
                                        "timestamp", "seq", "token", "pid", "stream",
                                        "data", "retcode", "output", "error", "reason",
                                        "ack"]),
                       json_values, max_size=15),
       st.sampled_from(sorted(ALL_TYPES)))
def test_objects_with_protocol_keys_and_any_values(obj, msg_type):
    """Most random JSON is refused at once for lacking a type; here every key is one the
    parser looks at, so the per-field checks are exercised."""
    obj.setdefault("type", msg_type)
    parse_or_refuse(json.dumps(obj))
    parse_or_refuse(json.dumps(obj), SERVER_TYPES)


@FUZZ
@given(st.binary(max_size=200) | st.integers() | st.none() | st.lists(st.text(max_size=5))
       | st.builds(bytearray, st.binary(max_size=50)))
def test_non_text_frames_are_refused(frame):
    with pytest.raises(ProtocolError):
        parse_message(frame)


# ------------------------------------------------------------------ mutated valid messages

@FUZZ
@given(st.data())
def test_structurally_mutated_messages_parse_or_are_refused(data):
    message = data.draw(valid_messages())
    obj = message.to_dict()
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        if not obj:
            break
        obj = mutate_object(data.draw, obj)
    parse_or_refuse(json.dumps(obj))
    parse_or_refuse(json.dumps(obj), SERVER_TYPES)


@FUZZ
@given(st.data())
def test_textually_mutated_frames_parse_or_are_refused(data):
    frame = encode(data.draw(valid_messages()))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        frame = mutate_text(data.draw, frame)
    parse_or_refuse(frame)
    parse_or_refuse(frame, SERVER_TYPES)


@FUZZ
@given(valid_messages(WRAPPER_TYPES), st.sampled_from(["job_name", "job_instance", "machine"]),
       st.sampled_from(["", None, 0, [], {}, "x" * (MAX_NAME_LENGTH + 1)]))
def test_a_bad_common_field_is_always_refused(message, name, bad_value):
    obj = message.to_dict()
    if bad_value is None:
        del obj[name]
    else:
        obj[name] = bad_value
    with pytest.raises(ProtocolError):
        parse_message(json.dumps(obj))


@FUZZ
@given(valid_messages(WRAPPER_TYPES), st.sampled_from(sorted(SERVER_TYPES - WRAPPER_TYPES)))
def test_each_side_refuses_the_other_sides_types(message, server_type):
    obj = message.to_dict()
    obj["type"] = server_type
    with pytest.raises(ProtocolError):
        parse_message(json.dumps(obj), WRAPPER_TYPES)


# ------------------------------------------------------------------ round trip

def fields_of(message):
    return {name: getattr(message, name) for name in (
        "type", "job_name", "job_instance", "machine", "timestamp", "seq", "token", "pid",
        "stream", "data", "retcode", "output", "error", "reason", "ack")}


@FUZZ
@given(valid_messages())
def test_valid_messages_round_trip(message):
    allowed = WRAPPER_TYPES if message.type in WRAPPER_TYPES else SERVER_TYPES
    parsed = parse_message(encode(message), allowed)
    expected = fields_of(message)
    if message.type == "error" and message.error is None:
        expected["error"] = ""
    assert fields_of(parsed) == expected


@FUZZ
@given(valid_messages(WRAPPER_TYPES),
       st.dictionaries(st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=8)
                       .map(lambda key: "x_" + key), json_values, max_size=4))
def test_unknown_extra_fields_are_ignored(message, extra):
    """The server may add fields; an older parser must not choke on them."""
    obj = message.to_dict()
    obj.update(extra)
    assert fields_of(parse_message(json.dumps(obj))) == fields_of(message)


def test_seed_messages_without_seq_or_token_are_understood():
    """Exactly the seed wrapper's messages: no seq, no token."""
    common = {"job_name": "backup", "job_instance": "backup_1700000000", "machine": "web1",
              "timestamp": "2024-01-01T00:00:00+00:00"}
    for extra in ({"type": "connect"}, {"type": "start", "pid": 42},
                  {"type": "heartbeat"},
                  {"type": "output", "stream": "stdout", "data": "line\n"},
                  {"type": "complete", "retcode": 0, "output": "all\n"},
                  {"type": "error", "error": "boom"}):
        message = parse_message(json.dumps(dict(common, **extra)))
        assert message.seq is None and message.token is None
        check_valid(message, WRAPPER_TYPES)
