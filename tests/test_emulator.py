"""The Google Chat webhook emulator, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import requests

from chat_magic.emulator import Emulator, render_page, validate_message
from chat_magic.emulator.server import _stdlib_schema_check, proto_available

REPO = Path(__file__).resolve().parent.parent
FALLBACK = {"messageReplyOption": "REPLY_MESSAGE_FALLBACK_TO_NEW_THREAD"}
OR_FAIL = {"messageReplyOption": "REPLY_MESSAGE_OR_FAIL"}
needs_proto = pytest.mark.skipif(not proto_available(), reason="google-apps-chat is not installed")


@pytest.fixture
def emu():
    e = Emulator(qps=None).start()
    try:
        yield e
    finally:
        e.stop()


def post(url, body=None, params=None, timeout=5, data=None):
    if data is not None:
        return requests.post(url, data=data, params=params, timeout=timeout,
                             headers={"Content-Type": "application/json; charset=UTF-8"})
    return requests.post(url, json=body, params=params, timeout=timeout)


def error_of(r):
    assert r.headers["Content-Type"] == "application/json; charset=UTF-8"
    err = r.json()["error"]
    assert set(err) >= {"code", "message", "status"}
    assert err["code"] == r.status_code
    return err


def card(title="T", widgets=1, card_id=None, header=True):
    c = {"sections": [{"widgets": [{"textParagraph": {"text": f"w{i}"}} for i in range(widgets)]}]}
    if header:
        c["header"] = {"title": title} if title is not None else {"subtitle": "no title"}
    entry = {"card": c}
    if card_id:
        entry["cardId"] = card_id
    return entry


# --------------------------------------------------------------------------- creating and threads


def test_created_reply_has_name_thread_and_request_fields(emu):
    r = post(emu.webhook_url("AAAA"), {"text": "hello *world*", "thread": {"threadKey": "k1"}}, FALLBACK)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json; charset=UTF-8"
    reply = r.json()
    assert re.fullmatch(r"spaces/AAAA/messages/[\w-]+\.[\w-]+", reply["name"])
    assert re.fullmatch(r"spaces/AAAA/threads/[\w-]+", reply["thread"]["name"])
    assert reply["thread"]["threadKey"] == "k1"
    assert reply["text"] == "hello *world*"
    assert datetime.fromisoformat(reply["createTime"].replace("Z", "+00:00")).tzinfo is not None
    assert "_emu" not in reply
    if proto_available():  # the reply itself is a valid google.chat.v1.Message
        from google.apps.chat_v1.types import Message

        assert Message.from_json(r.text, ignore_unknown_fields=False).name == reply["name"]
    [stored] = emu.messages()
    assert stored["name"] == reply["name"] and stored["thread"] == reply["thread"]
    assert stored["_emu"]["space"] == "AAAA"
    assert stored["_emu"]["messageReplyOption"] == "REPLY_MESSAGE_FALLBACK_TO_NEW_THREAD"
    assert stored["_emu"]["requestId"] is None
    assert isinstance(stored["_emu"]["received_at"], float)
    assert emu.messages("AAAA") == emu.messages("spaces/AAAA") == [stored]
    assert emu.messages("BBBB") == []


def test_fallback_option_same_key_same_thread_per_sender(emu):
    url = emu.webhook_url("AAAA")
    first = post(url, {"text": "one", "thread": {"threadKey": "run-1"}}, FALLBACK).json()
    second = post(url, {"text": "two", "thread": {"threadKey": "run-1"}}, FALLBACK).json()
    other = post(url, {"text": "three", "thread": {"threadKey": "run-2"}}, FALLBACK).json()
    assert second["thread"]["name"] == first["thread"]["name"]
    assert second.get("threadReply") is True and "threadReply" not in first
    assert other["thread"]["name"] != first["thread"]["name"]
    # keys are per sender: another webhook (token) with the same key gets its own thread
    foreign = post(emu.webhook_url("AAAA", token="other-webhook"), {"text": "x", "thread": {"threadKey": "run-1"}}, FALLBACK).json()
    assert foreign["thread"]["name"] != first["thread"]["name"]
    threads = emu.threads("AAAA")
    assert [m["text"] for m in threads[first["thread"]["name"]]] == ["one", "two"]
    assert len(threads) == 3


def test_no_reply_option_always_starts_a_new_thread(emu):
    url = emu.webhook_url()
    names = {post(url, {"text": f"m{i}", "thread": {"threadKey": "same"}}).json()["thread"]["name"] for i in range(3)}
    assert len(names) == 3
    # and the key was not registered: a later fallback request starts yet another thread
    later = post(url, {"text": "m4", "thread": {"threadKey": "same"}}, FALLBACK).json()
    assert later["thread"]["name"] not in names
    assert all(m["_emu"]["messageReplyOption"] == "MESSAGE_REPLY_OPTION_UNSPECIFIED" for m in emu.messages()[:3])


def test_reply_or_fail(emu):
    url = emu.webhook_url()
    r = post(url, {"text": "x", "thread": {"threadKey": "nope"}}, OR_FAIL)
    assert r.status_code == 404 and error_of(r)["status"] == "NOT_FOUND"
    assert emu.messages() == []
    start = post(url, {"text": "start", "thread": {"threadKey": "k"}}, FALLBACK).json()
    reply = post(url, {"text": "reply", "thread": {"threadKey": "k"}}, OR_FAIL)
    assert reply.status_code == 200 and reply.json()["thread"]["name"] == start["thread"]["name"]
    by_name = post(url, {"text": "by name", "thread": {"name": start["thread"]["name"]}}, OR_FAIL)
    assert by_name.status_code == 200 and by_name.json()["thread"]["name"] == start["thread"]["name"]
    bad = post(url, {"text": "x"}, {"messageReplyOption": "REPLY_PLEASE"})
    assert bad.status_code == 400 and "message_reply_option" in error_of(bad)["message"]


def test_deprecated_threadkey_query_parameter(emu):
    url = emu.webhook_url()
    a = post(url, {"text": "a"}, {**FALLBACK, "threadKey": "q"}).json()
    b = post(url, {"text": "b"}, {**FALLBACK, "threadKey": "q"}).json()
    assert a["thread"]["name"] == b["thread"]["name"] and b["thread"]["threadKey"] == "q"


def test_request_id_is_idempotent_and_replays_skip_the_quota():
    with Emulator(qps=1.0) as emu:
        url = emu.webhook_url()
        first = post(url, {"text": "once"}, {"requestId": "req-1"})
        replay = post(url, {"text": "once, changed"}, {"requestId": "req-1"})
        assert first.status_code == replay.status_code == 200  # the replay is not refused by the quota
        assert replay.json() == first.json()
        assert [m["text"] for m in emu.messages()] == ["once"]
        assert emu.messages()[0]["_emu"]["requestId"] == "req-1"
        stats = emu.stats()
        assert stats["duplicates_suppressed"] == 1 and stats["created"] == 1 and stats["200"] == 2
        assert [r["outcome"] for r in emu.requests] == ["created", "duplicate"]
        # a new request id right away is a new create, and hits the quota
        assert post(url, {"text": "two"}, {"requestId": "req-2"}).status_code == 429
        # request ids are per space
        assert post(emu.webhook_url("BBBB"), {"text": "b"}, {"requestId": "req-1"}).json()["name"].startswith("spaces/BBBB/")


def test_client_message_id(emu):
    url = emu.webhook_url()
    r = post(url, {"text": "x"}, {"messageId": "client-abc-1"})
    assert r.json()["name"] == "spaces/AAAA/messages/client-abc-1"
    assert post(url, {"text": "y"}, {"messageId": "client-abc-1"}).status_code == 409
    assert post(url, {"text": "y"}, {"messageId": "Bad_ID"}).status_code == 400


# --------------------------------------------------------------------------- quota


def test_quota_429_and_recovery_after_one_second():
    with Emulator(qps=1.0) as emu:
        url = emu.webhook_url("AAAA")
        t0 = time.monotonic()
        assert post(url, {"text": "1"}).status_code == 200
        r = post(url, {"text": "2"})
        assert r.status_code == 429
        assert error_of(r)["status"] == "RESOURCE_EXHAUSTED"
        assert "Retry-After" not in r.headers  # Google sends none
        assert post(emu.webhook_url("BBBB"), {"text": "other space"}).status_code == 200  # per space
        time.sleep(max(0.0, 1.05 - (time.monotonic() - t0)))
        assert post(url, {"text": "3"}).status_code == 200
        assert [m["text"] for m in emu.messages("AAAA")] == ["1", "3"]
        assert emu.stats()["429"] == 1


def test_quota_order_auth_then_quota_then_validation():
    with Emulator(qps=5.0, key="K", token="T") as emu:
        url = emu.webhook_url()
        assert post(url, {"nope": 1}).status_code == 400  # rejected: consumes no quota
        assert post(url, {"text": "ok"}).status_code == 200
        assert post(url, {"nope": 1}).status_code == 429  # quota is checked before validation
        assert post(emu.webhook_url(token="wrong"), {"text": "x"}).status_code == 403  # auth before quota


def test_concurrent_requests_quota_admits_one():
    with Emulator(qps=1.0) as emu:
        url = emu.webhook_url()
        codes = []
        barrier = threading.Barrier(6)

        def send(i):
            barrier.wait()
            codes.append(post(url, {"text": f"c{i}"}).status_code)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(codes) == [200] + [429] * 5
        assert len(emu.messages()) == 1


def test_concurrent_creates_without_quota_are_all_stored(emu):
    url = emu.webhook_url()
    with requests.Session() as s:
        def send(i):
            assert s.post(url, json={"text": f"p{i}"}, timeout=5).status_code == 200

        threads = [threading.Thread(target=send, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    msgs = emu.wait_for(20, timeout=5)
    assert len({m["name"] for m in msgs}) == 20
    assert sorted(m["text"] for m in msgs) == sorted(f"p{i}" for i in range(20))


# --------------------------------------------------------------------------- auth


def test_auth_with_configured_key_and_token():
    with Emulator(key="the-key", token="the-token", qps=None) as emu:
        good = emu.webhook_url()
        assert "key=the-key" in good and "token=the-token" in good
        r = post(emu.webhook_url(key="wrong"), {"text": "x"})
        err = error_of(r)
        assert r.status_code == 400 and err["status"] == "INVALID_ARGUMENT"
        assert err["message"] == "API key not valid. Please pass a valid API key."
        assert err["details"][0]["reason"] == "API_KEY_INVALID"
        r = post(emu.webhook_url(token="wrong"), {"text": "x"})
        assert r.status_code == 403 and error_of(r)["status"] == "PERMISSION_DENIED"
        r = post(f"{emu.base_url}/v1/spaces/AAAA/messages?token=the-token", {"text": "x"})
        assert r.status_code == 400
        assert post(good, {"text": "x"}).status_code == 200
        assert len(emu.messages()) == 1


def test_auth_without_configured_secrets(emu):
    assert post(emu.webhook_url(key="anything", token="whatever"), {"text": "x"}).status_code == 200
    assert post(f"{emu.base_url}/v1/spaces/AAAA/messages?key=k", {"text": "x"}).status_code == 403
    assert post(f"{emu.base_url}/v1/spaces/AAAA/messages?token=t", {"text": "x"}).status_code == 400
    assert post(f"{emu.base_url}/v1/spaces/AAAA/messages?key=&token=", {"text": "x"}).status_code == 400
    assert emu.webhook_url("S1") == f"{emu.base_url}/v1/spaces/S1/messages?key=emu-key-0000&token=emu-token-0000"


def test_other_paths_and_methods(emu):
    assert requests.post(f"{emu.base_url}/v1/spaces/AAAA/nothing", json={"text": "x"}).status_code == 404
    r = requests.get(emu.webhook_url())
    assert r.status_code == 401 and error_of(r)["status"] == "UNAUTHENTICATED"  # a webhook cannot read
    assert emu.messages() == []
    assert [rec["status"] for rec in emu.requests] == [404, 401]


# --------------------------------------------------------------------------- validation


def test_invalid_json_and_non_object(emu):
    url = emu.webhook_url()
    r = post(url, data=b"{not json")
    assert r.status_code == 400
    err = error_of(r)
    assert err["status"] == "INVALID_ARGUMENT" and err["message"].startswith("Invalid JSON payload received.")
    r = post(url, data=b'["text"]')
    assert r.status_code == 400 and "Invalid JSON payload received." in error_of(r)["message"]
    r = post(url, data=b"\xff\xfe")
    assert r.status_code == 400
    assert emu.messages() == [] and emu.stats()["rejected"] == 3


@needs_proto
def test_unknown_fields_rejected_at_any_depth(emu):
    url = emu.webhook_url()
    r = post(url, {"text": "hi", "username": "bot"})  # Slack's field
    assert r.status_code == 400
    msg = error_of(r)["message"]
    assert msg.startswith("Invalid JSON payload received. Unknown name") and '"username"' in msg
    bad_widget = {"cardsV2": [{"cardId": "c", "card": {"sections": [{"widgets": [{"textParagraf": {"text": "x"}}]}]}}]}
    r = post(url, bad_widget)
    assert r.status_code == 400 and "textParagraf" in error_of(r)["message"]
    r = post(url, {"text": 42})
    assert r.status_code == 400 and "text" in error_of(r)["message"]
    assert emu.messages() == []


def test_fields_a_webhook_may_not_set(emu):
    r = post(emu.webhook_url(), {"text": "x", "privateMessageViewer": {"name": "users/1"}})
    assert r.status_code == 400 and "privateMessageViewer" in error_of(r)["message"]
    snake = post(emu.webhook_url(), {"text": "snake", "fallback_text": "fb", "thread": {"thread_key": "s"}}, FALLBACK)
    assert snake.status_code == 200
    assert snake.json()["fallbackText"] == "fb" and snake.json()["thread"]["threadKey"] == "s"


def test_not_strict_accepts_unknown_fields_but_keeps_limits():
    with Emulator(qps=None, strict=False) as emu:
        assert post(emu.webhook_url(), {"text": "hi", "username": "bot"}).status_code == 200
        assert post(emu.webhook_url(), {"username": "bot"}).status_code == 400  # still empty
        assert post(emu.webhook_url(), {"text": "x" * 4097}).status_code == 400
        assert [m["text"] for m in emu.messages()] == ["hi"]


def test_stdlib_schema_check_without_google_apps_chat():
    assert _stdlib_schema_check({"text": "x", "thread": {"threadKey": "k"}, "cardsV2": []}) is None
    assert "Unknown name \"username\"" in _stdlib_schema_check({"text": "x", "username": "u"})
    assert "thread" in _stdlib_schema_check({"text": "x", "thread": {"threadKee": "k"}})
    assert "text" in _stdlib_schema_check({"text": 1})
    assert _stdlib_schema_check({"cards_v2": [], "fallback_text": "f"}) is None


def test_text_limit_4096_characters(emu):
    url = emu.webhook_url()
    assert post(url, {"text": "é" * 4096}).status_code == 200  # characters, not bytes
    r = post(url, {"text": "x" * 4097})
    assert r.status_code == 400 and error_of(r)["message"] == "Message is longer than 4096 characters"
    assert len(emu.messages()) == 1


def test_empty_message_rejected(emu):
    url = emu.webhook_url()
    for body in ({}, {"text": ""}, {"text": "  \n "}, {"thread": {"threadKey": "k"}}, {"cardsV2": []}):
        r = post(url, body)
        assert r.status_code == 400, body
        assert error_of(r)["message"].startswith("Message cannot be empty")
    assert emu.messages() == []


def test_body_over_32000_bytes_rejected(emu):
    big = {"cardsV2": [{"cardId": "c", "card": {"sections": [
        {"widgets": [{"textParagraph": {"text": "y" * 400}} for _ in range(90)]}]}}]}
    raw = json.dumps(big).encode()
    assert len(raw) > 32_000
    r = post(emu.webhook_url(), data=raw)
    assert r.status_code == 400 and error_of(r)["status"] == "INVALID_ARGUMENT"
    assert "32000" in error_of(r)["message"]
    just_under = {"text": "z" * 4000, "fallbackText": "f" * (31_900 - 4000)}
    assert len(json.dumps(just_under).encode()) <= 32_000
    assert post(emu.webhook_url(), just_under).status_code == 200


@pytest.mark.parametrize(
    "cards, fragment",
    [
        ([card(title=None)], "header.title"),
        ([{"card": {"sections": [{"widgets": []}]}}], "at least one widget"),
        ([card(widgets=101)], "at most 100"),
        ([card(card_id="a"), card()], "cardId"),
    ],
    ids=["header-without-title", "empty-section", "101-widgets", "two-cards-one-id"],
)
def test_card_rules(emu, cards, fragment):
    r = post(emu.webhook_url(), {"cardsV2": cards})
    assert r.status_code == 400
    assert fragment in error_of(r)["message"]
    assert emu.messages() == []


def test_valid_cards_accepted(emu):
    body = {"fallbackText": "two cards", "cardsV2": [card("A", 100, "a"), card("B", 1, "b", header=False)]}
    r = post(emu.webhook_url(), body)
    assert r.status_code == 200
    assert r.json()["cardsV2"] == body["cardsV2"]
    assert emu.wait_for(1)[0]["cardsV2"][0]["card"]["header"]["title"] == "A"


def test_validate_message_function():
    msg, problem = validate_message(b'{"text": "hi", "thread": {"threadKey": "k"}}')
    assert problem is None and msg == {"text": "hi", "thread": {"threadKey": "k"}}
    msg, (status, body) = validate_message(b"nope")
    assert msg is None and status == 400 and body["error"]["status"] == "INVALID_ARGUMENT"


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("code, status", [("503", "UNAVAILABLE"), ("500", "INTERNAL"), ("504", "DEADLINE_EXCEEDED"), ("429", "RESOURCE_EXHAUSTED")])
def test_injected_http_errors_have_google_bodies(emu, code, status):
    emu.inject(code, count=2)
    url = emu.webhook_url()
    for _ in range(2):
        r = post(url, {"text": "x"})
        assert r.status_code == int(code)
        assert error_of(r)["status"] == status
    assert post(url, {"text": "after"}).status_code == 200
    assert [m["text"] for m in emu.messages()] == ["after"]
    assert emu.stats()["faults"] == {code: 2}
    assert [r["outcome"] for r in emu.requests] == ["fault", "fault", "created"]


def test_injected_502_is_an_html_page(emu):
    emu.inject(502)
    r = post(emu.webhook_url(), {"text": "x"})
    assert r.status_code == 502 and r.headers["Content-Type"].startswith("text/html")
    assert "502" in r.text and emu.messages() == []


def test_fault_reset_is_a_connection_error_and_stores_nothing(emu):
    emu.inject("reset")
    with pytest.raises(requests.ConnectionError):
        post(emu.webhook_url(), {"text": "lost"})
    assert emu.messages() == []
    assert emu.requests[-1]["outcome"] == "reset" and emu.requests[-1]["status"] is None
    assert post(emu.webhook_url(), {"text": "next"}).status_code == 200


def test_fault_lost_reply_stores_the_message(emu):
    emu.inject("lost_reply")
    with pytest.raises(requests.ConnectionError):
        post(emu.webhook_url(), {"text": "stored anyway"}, {"requestId": "r-lost"})
    [m] = emu.messages()
    assert m["text"] == "stored anyway"
    # the client's retry with the same requestId gets the stored message back, no duplicate
    retry = post(emu.webhook_url(), {"text": "stored anyway"}, {"requestId": "r-lost"})
    assert retry.status_code == 200 and retry.json()["name"] == m["name"]
    assert len(emu.messages()) == 1 and emu.stats()["duplicates_suppressed"] == 1


def test_fault_stall_times_the_client_out_then_stores(emu):
    # a 3 s stall: the client's 0.3 s timeout ends first however slowly a loaded machine runs it (1 s with a 0.9 s
    # bound: a client 0.7 s late failed it)
    emu.inject("stall", seconds=3.0)
    t0 = time.monotonic()
    with pytest.raises(requests.Timeout):
        post(emu.webhook_url(), {"text": "slow"}, timeout=0.3)
    assert time.monotonic() - t0 < 3.0
    [m] = emu.wait_for(1, timeout=10)
    assert m["text"] == "slow"


def test_fault_down_refuses_the_connection(emu):
    emu.inject("down")
    with pytest.raises(requests.ConnectionError):
        post(emu.webhook_url(), {"text": "x"})
    assert emu.messages() == [] and emu.requests[-1]["outcome"] == "down"
    assert post(emu.webhook_url(), {"text": "y"}).status_code == 200


def test_probabilistic_faults_are_seeded():
    def run():
        with Emulator(qps=None, seed=7) as emu:
            emu.inject("503", probability=0.5)
            codes = [post(emu.webhook_url(), {"text": str(i)}).status_code for i in range(16)]
            emu.clear_faults()
            assert post(emu.webhook_url(), {"text": "clean"}).status_code == 200
            return codes

    first, second = run(), run()
    assert first == second
    assert set(first) == {200, 503}


def test_unknown_fault_rejected(emu):
    with pytest.raises(ValueError):
        emu.inject("teapot")


def test_latency_is_added_to_creates(emu):
    emu.latency = 2.0
    t0 = time.monotonic()
    assert post(emu.webhook_url(), {"text": "x"}).status_code == 200
    assert time.monotonic() - t0 >= 2.0
    emu.latency = 0.0
    t0 = time.monotonic()
    assert post(emu.webhook_url(), {"text": "y"}).status_code == 200
    # under the latency it would have had: a loopback request on a loaded machine (a client 0.7 s late failed 0.5 s)
    assert time.monotonic() - t0 < 2.0


# --------------------------------------------------------------------------- outages and lifecycle


def test_set_down_and_back(emu):
    url = emu.webhook_url()
    with requests.Session() as s:
        assert s.post(url, json={"text": "before"}, timeout=5).status_code == 200
        emu.set_down(True)
        for _ in range(2):
            with pytest.raises(requests.ConnectionError):
                s.post(url, json={"text": "during"}, timeout=5)
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{emu.base_url}/healthz", timeout=5)
        emu.set_down(False)
        assert s.post(url, json={"text": "after"}, timeout=5).status_code == 200
    assert [m["text"] for m in emu.messages()] == ["before", "after"]
    assert [r["outcome"] for r in emu.requests] == ["created", "down", "down", "created"]


def test_stop_and_restart_on_the_same_port():
    emu = Emulator(qps=None).start()
    try:
        port = emu.port
        url = emu.webhook_url()
        assert post(url, {"text": "one"}).status_code == 200
        emu.stop()
        assert not emu.running
        with pytest.raises(requests.ConnectionError):
            post(url, {"text": "nobody home"})
        emu.start()
        assert emu.port == port and emu.webhook_url() == url
        assert post(url, {"text": "two"}).status_code == 200
        assert [m["text"] for m in emu.messages()] == ["one", "two"]
        emu.stop()
        with Emulator(qps=None, port=port) as again:  # a fresh emulator can take the port at once
            assert post(again.webhook_url(), {"text": "three"}).status_code == 200
            assert len(again.messages()) == 1
    finally:
        emu.stop()


def test_reset_forgets_everything(emu):
    emu.inject("503", count=5)
    emu.set_down(False)
    assert post(emu.webhook_url(), {"text": "x"}).status_code == 503
    emu.reset()
    assert emu.messages() == [] and emu.requests == [] and emu.stats()["requests"] == 0
    assert post(emu.webhook_url(), {"text": "y"}).status_code == 200  # the queued faults are gone


def test_wait_for_blocks_until_messages_arrive(emu):
    def later():
        time.sleep(0.2)
        post(emu.webhook_url("W"), {"text": "late"})

    threading.Thread(target=later).start()
    msgs = emu.wait_for(1, timeout=5, space="W")
    assert [m["text"] for m in msgs] == ["late"]
    with pytest.raises(TimeoutError):
        emu.wait_for(2, timeout=0.1)


def test_only_loopback_hosts():
    with pytest.raises(ValueError):
        Emulator(host="0.0.0.0")
    with pytest.raises(ValueError):
        Emulator(qps=0)


# --------------------------------------------------------------------------- secrets, pages


def test_request_records_and_logs_never_hold_key_or_token(capfd):
    with Emulator(key="SECRETKEY123", token="SECRETTOKEN456", qps=None) as emu:
        post(emu.webhook_url(), {"text": "ok"}, {"requestId": "r1"})
        post(emu.webhook_url(token="SECRETTOKEN456-wrong"), {"text": "no"})
        emu.inject("reset")
        with pytest.raises(requests.ConnectionError):
            post(emu.webhook_url(), {"text": "reset"})
        # a malformed request line, which http.server would normally log
        answers = b""
        for line in (b"BROKEN /v1/spaces/AAAA/messages?key=SECRETKEY123&token=SECRETTOKEN456 HTTP/1.1",
                     b"GET /v1/spaces/AAAA/messages?key=SECRETKEY123&token=SECRETTOKEN456 x y"):
            with socket.create_connection(("127.0.0.1", emu.port)) as s:
                s.sendall(line + b"\r\n\r\n")
                answers += s.recv(4096)
        # http.server echoes a bad request line in its error page: redacted there too
        assert b"Unsupported method" in answers and b"Bad request syntax" in answers
        assert b"SECRET" not in answers
        records = emu.requests
        page = requests.get(emu.base_url + "/").text
        api = requests.get(emu.base_url + "/api/messages").text
    dumped = json.dumps(records) + page + api + repr(emu)
    assert "SECRETKEY" not in dumped and "SECRETTOKEN" not in dumped
    assert records[0]["query"] == {"key": "…", "token": "…", "requestId": "r1"}
    assert {"time", "method", "path", "query", "status", "body", "outcome"} <= set(records[0])
    assert records[0]["path"] == "/v1/spaces/AAAA/messages" and records[0]["body"] == '{"text": "ok"}'
    out, err = capfd.readouterr()
    assert "SECRET" not in out + err


def test_pages_healthz_api_and_escaped_html(emu):
    post(emu.webhook_url(), {"text": "<script>alert(1)</script> & more"})
    assert requests.get(f"{emu.base_url}/healthz").text.strip() == "ok"
    api = requests.get(f"{emu.base_url}/api/messages").json()
    assert [m["text"] for m in api["messages"]] == ["<script>alert(1)</script> & more"]
    page = requests.get(f"{emu.base_url}/")
    assert page.headers["Content-Type"].startswith("text/html")
    assert "<script>alert" not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page.text
    assert "&lt;b&gt;" in render_page({"messages": [{"text": "<b>", "thread": {"name": "t"}}]})
    assert [r["method"] for r in emu.requests] == ["POST"]  # the emulator's own pages are not recorded


# --------------------------------------------------------------------------- CLI


def _readline(proc, timeout=10.0):
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            raise AssertionError(f"no line from the emulator CLI within {timeout} s (got {line!r})")
        ch = os.read(proc.stdout.fileno(), 1)
        if not ch:
            break
        line += ch
    return line.decode()


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-m", "chat_magic.emulator", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env,
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_prints_the_url_then_logs_messages(sig):
    proc = _cli("--port", "0", "--space", "DEMO", "--qps", "0")
    try:
        first = _readline(proc)
        m = re.fullmatch(
            r"Google Chat emulator: webhook URL (http://127\.0\.0\.1:\d+/v1/spaces/DEMO/messages\?key=[^&\s]+&token=\S+)\n",
            first,
        )
        assert m, first
        r = requests.post(m.group(1), json={"text": "from the CLI test\nsecond line"}, params=FALLBACK, timeout=5)
        assert r.status_code == 200
        logged = _readline(proc)
        assert "spaces/DEMO" in logged and "from the CLI test second line" in logged
        assert r.json()["thread"]["name"].rsplit("/", 1)[1] in logged
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 0
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_cli_refuses_a_non_loopback_host():
    proc = _cli("--host", "0.0.0.0", "--port", "0")
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 2
    assert out == b""
    assert len(err.decode().strip().splitlines()) == 1 and "loopback" in err.decode()
