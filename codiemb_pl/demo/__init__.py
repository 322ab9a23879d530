"""Small, original demo data that powers ``configs/quickstart.yaml``.

Everything in this folder was written for codiemb_pl (MIT, see ``README.md``); no sentence is taken
from a public dataset. The files are produced by ``python -m codiemb_pl.demo.generate`` from
hand-written building blocks and a seeded ``random.Random``, so re-running it rewrites them
byte-identically.

Files
-----
``ir_train.jsonl``
    Retrieval training triples ``{"query", "positives", "negatives"}`` over a mini knowledge base of
    household science and everyday technology (cooking chemistry, bicycles, batteries, home
    networking, first aid, weather, ...). Hard negatives are passages from the same topic family
    that do not answer the query.
``ir_dev/``
    BEIR-layout retrieval validation set (``corpus.jsonl``, ``queries.jsonl``, ``qrels/dev.tsv``).
    Its queries, answer passages and distractors are disjoint from the training texts.
``sts_train.jsonl`` / ``sts_dev.jsonl``
    Graded sentence pairs ``{"sentence1", "sentence2", "score"}`` on a 0-5 scale, built from
    templated scenes with controlled edits (paraphrase, minor/major detail change, negation,
    topic switch). Train and dev use disjoint scene templates, so no sentence is shared.

Load them with ``pkg://codiemb_pl/demo/<file>`` locations (see :mod:`codiemb_pl.paths`).
"""
