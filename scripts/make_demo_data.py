"""Deterministic generator of the codiemb_pl demo data (original text, MIT licensed).

Run ``python scripts/make_demo_data.py`` from the repository root to (re)write the packaged files
in ``codiemb_pl/demo/`` (``--out DIR`` writes them elsewhere):

* ``ir_train.jsonl``                     query / positives / hard negatives
* ``ir_dev/{corpus,queries}.jsonl``      BEIR-layout validation set
* ``ir_dev/qrels/dev.tsv``
* ``sts_train.jsonl``, ``sts_dev.jsonl`` graded sentence pairs (0-5)

The hand-written text lives in ``scripts/demo_text/`` as JSON; this script holds only the rules.
All randomness comes from seeded ``random.Random`` instances and every output is written with
explicit ordering, so re-running the script reproduces the shipped files byte for byte
(``tests/test_demo_data.py`` checks it).

Building blocks
---------------
``knowledge_base.json`` is a list of topic families ``{"key", "name", "train", "dev", "distractors"}``;
each passage is ``{"title", "text", "questions"}``:

* a ``train`` passage answers 1-2 questions; its negatives are 3-4 other train passages of the family;
* a ``dev`` passage answers exactly one question (the BEIR validation queries);
* a ``distractors`` passage answers none (same family, in the validation corpus only).

``sts_frames_{train,dev}.json`` are sentence templates ("scenes") with slots. Each slot value is a
group of interchangeable surface forms (synonyms); a frame names which slots are *minor* details and
which are *major* information, and has a few negated forms (``negs``). Pairs are derived with
controlled edits:

=====  ===========================================================
score  edit
=====  ===========================================================
5.0    same slot values, different template and/or synonyms
4.0    one minor detail changed
3.4    two minor details changed
3.0    one major piece of information changed
2.6    one major and one minor piece changed
2.4    negation of the same statement
2.0    two different scenes of the same topic
1.0    scenes of different topics within the same broad domain
0.0    scenes from unrelated domains
=====  ===========================================================

Train and dev use disjoint frames, so no sentence appears in both splits.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXT_DIR = Path(__file__).resolve().parent / "demo_text"
OUT_DIR = REPO_ROOT / "codiemb_pl" / "demo"
SEED = 20240611


# ----------------------------------------------------------------------------------------------
# Retrieval: household science & everyday technology
# ----------------------------------------------------------------------------------------------

@dataclass
class Passage:
    family: str
    title: str
    text: str
    questions: list[str] = field(default_factory=list)


@dataclass
class Family:
    key: str
    name: str
    train: list[Passage] = field(default_factory=list)
    dev: list[Passage] = field(default_factory=list)
    distractors: list[Passage] = field(default_factory=list)


def read_json(path: Path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def load_knowledge_base(path: Path) -> list[Family]:
    """Families from ``knowledge_base.json``, checked: train 1-2 questions, dev 1, distractors 0."""
    families = []
    for raw in read_json(path):
        family = Family(key=raw["key"], name=raw["name"])
        for part, allowed in (("train", (1, 2)), ("dev", (1,)), ("distractors", (0,))):
            for p in raw[part]:
                passage = Passage(family.key, p["title"], p["text"], list(p.get("questions", [])))
                if len(passage.questions) not in allowed:
                    raise ValueError(f"{path}: family {family.key!r}, {part} passage {passage.title!r} has "
                                     f"{len(passage.questions)} questions, expected {' or '.join(map(str, allowed))}")
                getattr(family, part).append(passage)
        families.append(family)
    return families


def build_ir(families: list[Family], rng: random.Random):
    """Return (train_records, corpus, queries, qrels)."""
    train: list[dict] = []
    for fam in families:
        for p in fam.train:
            others = [o.text for o in fam.train if o is not p]
            for q in p.questions:
                k = rng.choice((3, 4))
                train.append({"query": q, "positives": [p.text], "negatives": rng.sample(others, k)})
    rng.shuffle(train)

    docs = [p for fam in families for p in fam.dev + fam.distractors]
    rng.shuffle(docs)
    doc_id = {id(p): f"d{i:03d}" for i, p in enumerate(docs, 1)}
    corpus = [{"_id": doc_id[id(p)], "title": p.title, "text": p.text} for p in docs]

    dev_passages = [p for fam in families for p in fam.dev]
    rng.shuffle(dev_passages)
    queries, qrels = [], []
    for i, p in enumerate(dev_passages, 1):
        qid = f"q{i:03d}"
        queries.append({"_id": qid, "text": p.questions[0]})
        qrels.append((qid, doc_id[id(p)], 1))
    return train, corpus, queries, qrels


# ----------------------------------------------------------------------------------------------
# STS scene frames
# ----------------------------------------------------------------------------------------------
# Each slot value is a tuple of interchangeable surface forms. ``minor`` slots are details whose
# change leaves the gist intact; ``major`` slots carry the main information.

@dataclass
class Frame:
    name: str
    topic: str
    domain: str
    forms: list[str]
    negs: list[str]
    slots: dict[str, list[tuple[str, ...]]]
    minor: list[str]
    major: list[str]


def load_frames(path: Path) -> list[Frame]:
    """Scene frames from ``sts_frames_*.json``; slot values become tuples of synonyms."""
    return [Frame(f["name"], f["topic"], f["domain"], f["forms"], f["negs"],
                  {slot: [tuple(group) for group in groups] for slot, groups in f["slots"].items()},
                  f["minor"], f["major"]) for f in read_json(path)]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:] if s else s


def render(frame: Frame, template: str, values: dict[str, int], rng: random.Random) -> str:
    filled = {k: rng.choice(frame.slots[k][i]) for k, i in values.items()}
    return _cap(template.format(**filled))


def sample_values(frame: Frame, rng: random.Random) -> dict[str, int]:
    return {k: rng.randrange(len(v)) for k, v in frame.slots.items()}


def change(frame: Frame, values: dict[str, int], slot: str, rng: random.Random) -> dict[str, int]:
    new = dict(values)
    new[slot] = rng.choice([i for i in range(len(frame.slots[slot])) if i != values[slot]])
    return new


# target share of each score, for ~320 train / ~120 dev pairs
SCORE_PLAN = {5.0: 52, 4.0: 56, 3.4: 20, 3.0: 48, 2.6: 24, 2.4: 28, 2.0: 36, 1.0: 32, 0.0: 24}


def make_pair(score: float, frames: list[Frame], rng: random.Random) -> tuple[str, str] | None:
    if score >= 2.4:
        pool = [f for f in frames if score != 3.4 or len(f.minor) >= 2]
        fr = rng.choice(pool)
        v = sample_values(fr, rng)
        t1 = rng.choice(fr.forms)
        a = render(fr, t1, v, rng)
        if score == 5.0:
            b = render(fr, rng.choice([t for t in fr.forms if t != t1]), v, rng)
        elif score == 4.0:
            b = render(fr, rng.choice(fr.forms), change(fr, v, rng.choice(fr.minor), rng), rng)
        elif score == 3.4:
            s1, s2 = rng.sample(fr.minor, 2)
            b = render(fr, rng.choice(fr.forms), change(fr, change(fr, v, s1, rng), s2, rng), rng)
        elif score == 3.0:
            b = render(fr, rng.choice(fr.forms), change(fr, v, rng.choice(fr.major), rng), rng)
        elif score == 2.6:
            w = change(fr, change(fr, v, rng.choice(fr.major), rng), rng.choice(fr.minor), rng)
            b = render(fr, rng.choice(fr.forms), w, rng)
        else:  # 2.4 negation
            b = render(fr, rng.choice(fr.negs), v, rng)
        return a, b
    f1 = rng.choice(frames)
    if score == 2.0:
        pool = [f for f in frames if f.topic == f1.topic and f is not f1]
    elif score == 1.0:
        pool = [f for f in frames if f.domain == f1.domain and f.topic != f1.topic]
    else:
        pool = [f for f in frames if f.domain != f1.domain]
    if not pool:
        return None
    f2 = rng.choice(pool)
    a = render(f1, rng.choice(f1.forms), sample_values(f1, rng), rng)
    b = render(f2, rng.choice(f2.forms), sample_values(f2, rng), rng)
    return a, b


def build_sts(frames: list[Frame], total: int, rng: random.Random) -> list[dict]:
    scale = total / sum(SCORE_PLAN.values())
    plan = {s: round(n * scale) for s, n in SCORE_PLAN.items()}
    plan[4.0] += total - sum(plan.values())
    seen: set[frozenset[str]] = set()
    out: list[dict] = []
    for score, n in plan.items():
        made, tries = 0, 0
        while made < n and tries < 200 * n:
            tries += 1
            pair = make_pair(score, frames, rng)
            if pair is None:
                continue
            a, b = pair
            key = frozenset((a, b))
            if a == b or key in seen:
                continue
            seen.add(key)
            if rng.random() < 0.5:
                a, b = b, a
            out.append({"sentence1": a, "sentence2": b, "score": score})
            made += 1
    rng.shuffle(out)
    return out


# ----------------------------------------------------------------------------------------------
# Writing and checks
# ----------------------------------------------------------------------------------------------

def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_qrels(path: Path, qrels: list[tuple[str, str, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for q, d, s in qrels:
            fh.write(f"{q}\t{d}\t{s}\n")


def main(out_dir: Path = OUT_DIR, text_dir: Path = TEXT_DIR) -> dict:
    """Write every demo file under `out_dir` and return row counts and score histograms."""
    families = load_knowledge_base(text_dir / "knowledge_base.json")
    ir_train, corpus, queries, qrels = build_ir(families, random.Random(SEED))
    sts_train = build_sts(load_frames(text_dir / "sts_frames_train.json"), 320, random.Random(SEED + 1))
    sts_dev = build_sts(load_frames(text_dir / "sts_frames_dev.json"), 120, random.Random(SEED + 2))

    write_jsonl(out_dir / "ir_train.jsonl", ir_train)
    write_jsonl(out_dir / "ir_dev" / "corpus.jsonl", corpus)
    write_jsonl(out_dir / "ir_dev" / "queries.jsonl", queries)
    write_qrels(out_dir / "ir_dev" / "qrels" / "dev.tsv", qrels)
    write_jsonl(out_dir / "sts_train.jsonl", sts_train)
    write_jsonl(out_dir / "sts_dev.jsonl", sts_dev)

    return {
        "ir_train": len(ir_train), "ir_dev_corpus": len(corpus), "ir_dev_queries": len(queries),
        "sts_train": len(sts_train), "sts_dev": len(sts_dev),
        "sts_train_scores": dict(sorted(Counter(r["score"] for r in sts_train).items(), reverse=True)),
        "sts_dev_scores": dict(sorted(Counter(r["score"] for r in sts_dev).items(), reverse=True)),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"output folder (default: {OUT_DIR})")
    parser.add_argument("--text", type=Path, default=TEXT_DIR, help=f"folder of the text JSON files (default: {TEXT_DIR})")
    args = parser.parse_args()
    for key, value in main(args.out, args.text).items():
        print(f"{key}: {value}")
