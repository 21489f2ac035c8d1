"""The history: what was seen, heard and answered, kept in SQLite, found again by words and
by meaning, and asked about — after a real replay of the walkway clip with speech, after
a daemon killed with SIGKILL and restarted, over a real broker."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.publish as mqtt_publish
import pytest

from stream_rt.memory.embeddings import TextEmbedder
from stream_rt.memory.history import History
from stream_rt.memory.when import parse_when
from stream_rt.mllm import OpenAIBackend
from stream_rt.mllm.history_ask import HistoryAsker, ask_history, check_citations
from stream_rt.sinks.mqtt import MqttSink
from stream_rt.testing import Broker, Subscriber, chat_server, feed_graph
from stream_rt.testing import free_port as another_port

from .test_cli import run_cli
from .test_commands import Waiting
from .test_mqtt import settings, wait_until

WORD = "amiable"  # "had he married a more amiable woman ...", the fourth stretch of speech in the clip


@pytest.fixture(scope="module")
def replayed(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[dict[str, Any]]]]:
    """The walkway clip with speech replayed into a history: its file and the JSONL records."""
    where = tmp_path_factory.mktemp("replayed")
    history, out = where / "history.sqlite", where / "out.jsonl"
    result = run_cli("replay", str(samples / "walkway_speech.mkv"), "--history", str(history), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"history: {history}" in result.stderr
    yield history, [json.loads(line) for line in out.read_text().splitlines()]


def search(history: Path, *args: str) -> list[dict[str, Any]]:
    result = run_cli("history", "search", *args, "--history", str(history), "--json")
    assert result.returncode == 0, result.stderr
    entries: list[dict[str, Any]] = json.loads(result.stdout)["entries"]
    return entries


def test_a_spoken_word_finds_its_event_after_a_replay(replayed: tuple[Path, list[dict[str, Any]]]) -> None:
    history, records = replayed
    said = next(r for r in records if r["kind"] == "Event" and WORD in r["transcript"])
    by_words = search(history, WORD, "--mode", "fts")
    assert by_words and all(WORD in e["text"] for e in by_words), by_words
    assert {e["event_id"] for e in by_words} == {said["event_id"]}
    assert {e["kind"] for e in by_words} == {"event", "transcript"}, "the event carrying the words, and the words"
    event = next(e for e in by_words if e["kind"] == "event")
    assert event["source_id"] == "walkway_speech" and event["pts_ns"] == said["pts_ns"]
    assert event["wall_ns"] == said["wall_ns"] and event["text_rank"] in (1, 2) and event["similarity"] is None
    # By meaning, in other words than were said: the real all-MiniLM-L6-v2 embeddings.
    by_meaning = search(history, "he should have wed a kinder wife", "--mode", "semantic", "--limit", "2")
    assert by_meaning and WORD in by_meaning[0]["text"], by_meaning
    assert by_meaning[0]["similarity"] > 0.3
    hybrid = search(history, f"a more {WORD} woman")
    assert WORD in hybrid[0]["text"] and hybrid[0]["text_rank"] and hybrid[0]["similarity"]


def test_search_keeps_to_a_source_and_a_span_of_time(replayed: tuple[Path, list[dict[str, Any]]]) -> None:
    path, _ = replayed
    assert search(path, WORD, "--source", "walkway_speech", "--since", "1h")  # the command line's filters...
    history = History(path)  # ...and the Python API's (one embedder for the rest)
    try:
        assert not history.search(WORD, source="gate")
        assert not history.search(WORD, until="2000-01-01")
        assert not history.search(WORD, since="2999-01-01T00:00")
        assert history.search(WORD, source="walkway_speech", since="1h", mode="semantic")
    finally:
        history.close()


@pytest.mark.parametrize(
    "args,error",
    [
        (["--since", "last tuesday"], "--since: cannot read the time 'last tuesday': give a span back from now"),
        (["--until", "2h ago"], "--until: cannot read the time '2h ago'"),
        (["--limit", "0"], "a whole number >= 1"),
        (["--history", "/nonexistent/history.sqlite"], "no history at '/nonexistent/history.sqlite'"),
    ],
)
def test_bad_history_arguments_are_one_line_and_exit_2(
    replayed: tuple[Path, list[dict[str, Any]]], args: list[str], error: str
) -> None:
    history, _ = replayed
    result = run_cli("history", "search", WORD, "--history", str(history), *args)
    assert result.returncode == 2 and error in result.stderr, result.stderr
    if "--limit" not in args:  # argparse's own errors come with its usage line
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_history_ask_with_the_smoke_model_cites_only_ids_it_was_given(
    replayed: tuple[Path, list[dict[str, Any]]],
) -> None:
    history, records = replayed
    events = {r["event_id"] for r in records if r["kind"] == "Event"}
    result = run_cli("history", "ask", f"who married an {WORD} woman?", "--history", str(history), "--model",
                     "smoke", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["smoke"] and answer["status"] in ("ok", "invalid") and answer["text"]
    assert answer["sources"] and set(answer["sources"]) <= events, "what the model was given exists"
    assert set(answer["cited"]) <= set(answer["sources"]), "only ids it was given are kept"
    assert WORD in answer["entries"][0]["text"], "the best match first"
    if not answer["cited"]:  # random weights: expected; said, and the sources stand in
        assert "cited none of the entries" in answer["note"]
    text = run_cli("history", "ask", "who married?", "--history", str(history), "--model", "smoke")
    assert text.returncode == 0 and "sources: " in text.stdout and "not meaningful" in text.stdout, text.stdout
    refused = run_cli("history", "ask", "who married?", "--history", str(history))
    assert refused.returncode == 2 and "history ask needs a model" in refused.stderr


def kept_history(path: Path) -> History:
    """A history with four entries of two sources, embedded for real."""
    history = History(path, embedder=TextEmbedder())
    now = time.time_ns()
    rows = [
        ("event", "gate", "gate-01JX0000000000000000000001", now - 7200 * 10**9, 5 * 10**9,
         "Event new. Seen: person, truck. Zones: drive."),
        ("answer", "gate", "gate-01JX0000000000000000000001", now - 7190 * 10**9, 5 * 10**9,
         "Answer: a courier leaves a parcel at the door."),
        ("transcript", "porch", "", now - 60 * 10**9, 9 * 10**9, "Heard: I have a package for you"),
        ("watch", "porch", "porch-01JX0000000000000000000002", now - 30 * 10**9, 11 * 10**9,
         "Watch 'guests' (two people at the door): met (answers)."),
    ]  # fmt: skip
    ids = history.add_many(rows)
    history.store_vectors(ids, history.embedder.embed([r[5] for r in rows]))  # type: ignore[union-attr]
    return history


async def test_the_models_citations_are_checked_against_what_it_was_given(tmp_path: Path, free_port: int) -> None:
    """A model (behind the real OpenAI client) that cites one entry it was given and one id
    it made up: the first is kept, the second dropped and said."""
    history = kept_history(tmp_path / "history.sqlite")
    prompts: list[str] = []

    def reply(body: dict[str, Any]) -> str:
        prompts.append(json.dumps(body["messages"]))
        return ('{"summary": "The courier came two hours ago [gate-01JX0000000000000000000001], see also '
                '[gate-01JX000000000000000000000Z].", "confidence": 0.7}')  # fmt: skip

    runner = await chat_server(free_port, reply)
    try:
        backend = OpenAIBackend(f"http://127.0.0.1:{free_port}/v1", "m")
        answer = await ask_history(history, backend, "when did the delivery come?", since="3h")
        await backend.close()
    finally:
        await runner.cleanup()
    assert answer.status == "ok" and answer.answer is not None and "courier" in answer.answer["summary"]
    assert answer.cited == ["gate-01JX0000000000000000000001"]
    assert answer.dropped == ["gate-01JX000000000000000000000Z"]
    assert "dropped 1 cited id(s) that were not among the entries given" in answer.note
    assert "gate-01JX0000000000000000000001" in answer.sources and "[entry:3]" in prompts[0]
    assert "cite in square brackets" in prompts[0]
    history.close()


def test_citations_are_ids_given_and_only_whole_ids() -> None:
    given = ["gate-01JX0000000000000000000001", "entry:1"]
    assert check_citations("see entry:12 and [gate-01JX0000000000000000000001]", given) == (
        ["gate-01JX0000000000000000000001"], ["entry:12"],
    )  # fmt: skip
    assert check_citations("nothing cited", given) == ([], [])


async def test_an_empty_answer_makes_no_call(tmp_path: Path) -> None:
    history = History(tmp_path / "history.sqlite", embedder=None)
    backend = OpenAIBackend("http://127.0.0.1:9/v1", "m")  # nothing listens: a call would fail
    answer = await ask_history(history, backend, "when did the delivery come?")
    assert answer.status == "empty" and answer.sources == [] and "nothing in the history" in answer.note
    history.close()


def test_the_history_is_bounded_by_days_and_by_size_oldest_first(tmp_path: Path) -> None:
    history = History(tmp_path / "history.sqlite", keep_days=1, max_mb=1, embedder=None)
    now = time.time_ns()
    day = 86400 * 10**9
    history.add_many([("event", "gate", f"old-{i}", now - 2 * day, 0, f"old entry {i}") for i in range(10)])
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(5000)]
    rows = [("transcript", "gate", "", now - day // 2 + i, i, " ".join(rng.choice(words, 60))) for i in range(6000)]
    ids = history.add_many(rows)
    assert history.size_bytes() > 2**20
    deleted = history.prune(now)
    assert deleted >= 10 and not history.search("old entry", mode="fts"), "older than keep_days: gone"
    assert history.size_bytes() <= 2**20
    kept = history.entries(ids)
    assert kept and min(kept) > min(ids) and max(kept) == max(ids), "the oldest went first"
    assert (tmp_path / "history.sqlite").stat().st_size < 1.5 * 2**20, "freed pages went back to the file system"
    history.close()


def test_times_people_write() -> None:
    now = 1_750_000_000 * 10**9
    assert parse_when("2h", now) == now - 7200 * 10**9
    assert parse_when("90s", now) == now - 90 * 10**9
    assert parse_when("1.5d", now) == now - int(1.5 * 86400) * 10**9
    assert parse_when("today", now) <= now < parse_when("today", now) + 86400 * 10**9 + 3600 * 10**9
    assert parse_when("yesterday", now) < parse_when("today", now)
    assert parse_when("2025-06-15T14:40:00+00:00", now) == 1_749_998_400 * 10**9
    with pytest.raises(ValueError, match="cannot read the time"):
        parse_when("soon", now)


def entries_saying(path: Path, word: str) -> list[tuple[str, str]]:
    """(event id, kind) of the entries whose text has ``word``, read beside the daemon."""
    try:
        with sqlite3.connect(path) as db:
            return db.execute("SELECT event_id, kind FROM entries WHERE text LIKE ?", (f"%{word}%",)).fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []


def unembedded(path: Path, source: str) -> int:
    """How many of the source's entries have no vector yet, read beside the daemon."""
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT COUNT(*) FROM entries WHERE source = ? AND id NOT IN "
                              "(SELECT entry_id FROM vectors)", (source,)).fetchone()[0])  # fmt: skip


@pytest.mark.timeout(300)
async def test_the_history_survives_a_sigkill_and_a_restart(samples: Path, tmp_path: Path) -> None:
    """`stream-rt run` replaying the clip into its history, killed with SIGKILL once the first
    words are kept; restarted (another source, the same history), then searched: the words
    and their event are there, by word and by meaning."""
    path = tmp_path / "history.sqlite"
    first = tmp_path / "first.toml"
    first.write_text(f'[[sources]]\nid = "walkway"\nurl = "{samples / "walkway_speech.mkv"}"\n'
                     f'[history]\npath = "{path}"\n')  # fmt: skip
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stream_rt.cli", "run", str(first), "--speed", "4", stderr=asyncio.subprocess.PIPE
    )
    try:
        said = lambda: [kind for _, kind in entries_saying(path, "leisure")]  # noqa: E731
        await wait_until(lambda: "event" in said(), 120, "the first words' event in the history")
    finally:
        daemon.send_signal(signal.SIGKILL)
        stderr = (await asyncio.wait_for(daemon.communicate(), 30))[1].decode()
    assert daemon.returncode == -signal.SIGKILL, stderr[-2000:]
    kept = entries_saying(path, "leisure")
    event_id = next(e for e, kind in kept if kind == "event")
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    second = tmp_path / "second.toml"
    synthetic = "synthetic:?frames=100000&fps=25&width=64&height=48&active_s=1&period_s=2"
    # with a model: it loads as the killed run's entries are embedded (two loads at once in one process failed)
    second.write_text(f'[[sources]]\nid = "cam"\nurl = "{synthetic}"\n[trigger]\nconfirm_s = 0.1\ncutoff_s = 0.3\n'
                      f'[history]\npath = "{path}"\n[mllm]\nmodel = "smoke"\n')  # fmt: skip
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stream_rt.cli", "run", str(second), stderr=asyncio.subprocess.PIPE
    )
    try:
        await wait_until(lambda: entries_saying(path, "Event end"), 60, "the restarted daemon's episodes")
        await wait_until(lambda: not unembedded(path, "walkway"), 60, "the killed run's entries embedded")
    finally:
        daemon.send_signal(signal.SIGTERM)
        stderr = (await asyncio.wait_for(daemon.communicate(), 30))[1].decode()
    assert daemon.returncode == 0, stderr[-2000:]
    assert event_id in {e["event_id"] for e in search(path, "leisure")}
    assert event_id in {e["event_id"] for e in search(path, "leisure to consider his power", "--mode", "semantic")}
    assert {e["source_id"] for e in search(path, "event end", "--mode", "fts", "--limit", "50")} >= {"cam"}


async def test_history_questions_over_a_real_broker(tmp_path: Path, free_port: int) -> None:
    """Bad questions on <prefix>/history/ask/set are refused with a reason on
    <prefix>/history/answers; a good one is answered there (QoS 1, through the outbox),
    with the ids the model cited."""
    history = kept_history(tmp_path / "history.sqlite")
    history.close()
    broker = Broker(free_port, tmp_path)
    broker.start()
    model_port = another_port()

    def reply(body: dict[str, Any]) -> str:
        return '{"summary": "A parcel, two hours ago [gate-01JX0000000000000000000001].", "confidence": 0.6}'

    runner = await chat_server(model_port, reply)
    backend = OpenAIBackend(f"http://127.0.0.1:{model_port}/v1", "m")
    asker = HistoryAsker(tmp_path / "history.sqlite", backend, TextEmbedder(), {"gate", "porch"})
    sink = MqttSink("mqtt", settings(free_port, tmp_path), sources={"gate", "porch"}, history=asker)
    graph = feed_graph(sink, range(0), drain_timeout_s=2, feed=Waiting)
    run = asyncio.create_task(graph.run())
    subscriber = Subscriber(free_port, "stream_rt/history/#")
    try:
        await asyncio.wait_for(subscriber.connected.wait(), 5)
        await wait_until(lambda: sink.connected, 5, "the sink to connect")
        await asyncio.sleep(0.2)
        send = lambda payload: mqtt_publish.single("stream_rt/history/ask/set", payload, qos=1, hostname="127.0.0.1",  # noqa: E731
                                                   port=free_port)  # fmt: skip
        bad = [
            (b"when did the delivery come?", "JSON object"),
            (b'{"since": "2h"}', "question: Field required"),
            (b'{"question": "' + b"why " * 300 + b'"}', "at most 1000 characters"),
            (b'{"question": "when?", "since": "last tuesday"}', "since: cannot read the time 'last tuesday'"),
            (b'{"question": "when?", "source": "garage"}', "unknown source 'garage'"),
            (b'{"question": "when?", "colour": "red"}', "Extra inputs are not permitted"),
            (b"\xff\xfe", "not UTF-8"),
            (b"[" * 4000, "JSON object"),  # nested too deep for the parser
        ]
        for payload, _ in bad:
            await asyncio.to_thread(send, payload)
        await asyncio.to_thread(send, b'{"question": "when did the delivery come?", "since": "3h", "id": "q1"}')
        await wait_until(lambda: len(subscriber.payloads("/history/answers")) >= len(bad) + 1, 20, "the replies")
        replies = subscriber.payloads("/history/answers")
        for (_, error), got in zip(bad, replies, strict=False):
            assert got["ok"] is False and error in str(got["error"]), (error, got)
        answer = replies[len(bad)]
        assert answer["ok"] is True and answer["id"] == "q1" and answer["status"] == "ok", answer
        assert answer["cited"] == ["gate-01JX0000000000000000000001"] and answer["dropped"] == []
        assert "gate-01JX0000000000000000000001" in answer["sources"]  # type: ignore[operator]
        assert not run.done(), "the daemon keeps running after bad questions"
    finally:
        await subscriber.close()
        graph.stop()
        await asyncio.wait_for(run, 10)
        await backend.close()
        await runner.cleanup()
        asker.close()
        broker.kill()
    counters = graph.statistics()["nodes"]["mqtt"]
    assert counters["history_asks_refused"] == len(bad) and counters["history_asks_answered"] == 1
