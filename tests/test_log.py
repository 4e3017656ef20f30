"""Structured logs: JSON lines with stable fields, level filtering, thread-safe node_id."""

from __future__ import annotations

import json
import threading

import pytest
import structlog

from zmesh.log import configure_logging, get_logger


@pytest.fixture(autouse=True)
def _reset_structlog():
    yield
    structlog.reset_defaults()


def test_json_lines_carry_event_level_timestamp_and_node_id(capsys) -> None:
    configure_logging("info", json=True, node_id="node-x")
    log = get_logger("test")
    log.info("route.decided", request_id="r1", target="node-b", forward=True)
    worker = threading.Thread(target=lambda: log.info("request.completed", request_id="r1"))
    worker.start()
    worker.join()
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["event"] for x in lines] == ["route.decided", "request.completed"]
    first = lines[0]
    assert first["node_id"] == "node-x" and first["level"] == "info"
    assert first["request_id"] == "r1" and first["forward"] is True and "timestamp" in first
    assert lines[1]["node_id"] == "node-x"  # also from another thread (the engine's)


def test_level_filter_drops_lower_levels(capsys) -> None:
    configure_logging("warning", json=True)
    log = get_logger()
    log.info("request.received", request_id="quiet")
    log.warning("peer.suspect", peer="node-b")
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["event"] for x in lines] == ["peer.suspect"]


def test_console_format_is_human_readable(capsys) -> None:
    configure_logging("info", json=False, node_id="node-y")
    get_logger().info("peer.joined", peer="node-z")
    out = capsys.readouterr().out
    assert "peer.joined" in out and "node-z" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.splitlines()[0])


def test_values_json_cannot_hold_are_written_as_their_repr(capsys) -> None:
    class Opaque:
        def __repr__(self) -> str:
            return "<opaque 7>"

    configure_logging("info", json=True)
    log = get_logger()
    log.info("peer.joined", peer=Opaque(), scores={"node-a": 0.25}, path=("a", "b"))
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("dealer.handler_failed")
    first, second = (json.loads(x) for x in capsys.readouterr().out.splitlines())
    assert first["peer"] == "<opaque 7>"
    assert first["scores"] == {"node-a": 0.25} and first["path"] == ["a", "b"]
    assert second["level"] == "error" and "ValueError: boom" in second["exception"]
