"""The real data loaders, deduplication, splits and suite validation (reads the installed packages' files)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from pydantic import ValidationError

from reprmerge_core.data import (
    SUITES,
    TASK_NAMES,
    SplitConfig,
    SuiteConfig,
    Task,
    deduplicate,
    load_suite,
    load_task,
    normalise,
    resolve_suite,
    split_task,
)

# data.md's table of deduplicated sizes, and per-class counts measured on the same files.
EXPECTED = {
    "sms_spam": {"ham": 3954, "spam": 557},
    "trec6": {"ABBR": 86, "DESC": 1152, "ENTY": 1245, "HUM": 1215, "LOC": 824, "NUM": 858},
    "movie_sentiment": {"negative": 5075, "positive": 4995},
    "tweet_sentiment": {"negative": 1057, "positive": 2315},
    "amazon_sentiment": {"negative": 1233, "positive": 1744},
    "nyt_sentiment": {"negative": 1756, "positive": 1175},
    "bbc_news": {"business": 503, "entertainment": 369, "politics": 403, "sports": 502, "tech": 347},
    "subjectivity": {"plot": 1083, "review": 1083},
}
DATA_MD_SIZES = {"sms_spam": 4511, "trec6": 5380, "movie_sentiment": 10070, "tweet_sentiment": 3372,
                 "amazon_sentiment": 2977, "nyt_sentiment": 2931, "bbc_news": 2124, "subjectivity": 2166}


def keys(texts: tuple[str, ...]) -> set[str]:
    return {normalise(t) for t in texts}


def test_every_task_of_data_md_is_known() -> None:
    assert set(TASK_NAMES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loader_sizes_labels_and_no_duplicates(name: str) -> None:
    task = load_task(name)
    assert task.name == name
    assert len(task) == DATA_MD_SIZES[name]
    assert task.label_names == tuple(EXPECTED[name])  # the stable order that defines label ids
    assert dict(Counter(task.label_names[y] for y in task.labels)) == EXPECTED[name]
    assert len(keys(task.texts)) == len(task), "texts must be unique after case/whitespace folding"
    assert all(t.strip() for t in task.texts)


def test_loaders_parse_content_not_just_counts() -> None:
    trec = load_task("trec6")
    i = trec.texts.index("What is the full form of .com ?")
    assert trec.label_names[trec.labels[i]] == "ABBR"
    sms = load_task("sms_spam")
    assert sms.label_names[sms.labels[sms.texts.index("Ok lar... Joking wif u oni...")]] == "ham"
    bbc = load_task("bbc_news")
    assert any("£" in t for t in bbc.texts), "the latin-1 BBC file must decode its pound sign"
    movie = load_task("movie_sentiment")
    assert movie.label_names[movie.labels[0]] == "positive"  # first snippet has mean rating +2.27


def test_deduplicate_folds_case_and_space_and_drops_conflicts() -> None:
    raw = [("Hello  World", "a"), ("hello world", "a"), ("Same text", "a"), ("same\ttext ", "b"),
           ("SAME TEXT", "a"), ("   ", "a"), ("Other", "b")]
    assert deduplicate(raw) == [("Hello  World", "a"), ("Other", "b")]


def test_subjectivity_shares_no_text_with_movie_sentiment() -> None:
    assert not keys(load_task("subjectivity").texts) & keys(load_task("movie_sentiment").texts)


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_suite_splits_have_documented_sizes_and_are_disjoint(suite: str) -> None:
    config = SUITES[suite]
    loaded = load_suite(suite)
    assert [s.name for s in loaded] == list(config.tasks)
    for s in loaded:
        assert len(s.test) == config.split.test_size
        assert len(s.calibration) == config.split.calibration_size
        assert len(s.train) == min(config.split.train_size, DATA_MD_SIZES[s.name] - config.split.test_size
                                   - config.split.calibration_size)
        train, cal, test = keys(s.train.texts), keys(s.calibration), keys(s.test.texts)
        assert not (train & cal) and not (train & test) and not (cal & test)
        assert s.config == config.split


def test_text6_and_tiny_follow_data_md() -> None:
    """data.md's pilot, as an independent reference: six tasks, "per task the deduplicated data shuffled with seed 0:
    first 500 test, next 500 calibration (inputs only), next <= 2,000 train"; its tiny variant: 200 test, 256 train."""
    pilot = load_suite("text6")
    assert [s.name for s in pilot] == ["sms_spam", "trec6", "bbc_news", "movie_sentiment", "tweet_sentiment",
                                       "subjectivity"]
    for s in pilot:
        texts = load_task(s.name).texts
        order = list(range(len(texts)))
        random.Random(0).shuffle(order)
        assert list(s.test.texts) == [texts[i] for i in order[:500]]
        assert list(s.calibration) == [texts[i] for i in order[500:1000]]
        assert list(s.train.texts) == [texts[i] for i in order[1000:3000]]
    tiny = load_suite("tiny")
    assert [s.name for s in tiny] == ["sms_spam", "trec6", "movie_sentiment"]
    assert all(len(s.test) == 200 and len(s.train) == 256 for s in tiny)


def test_splits_are_deterministic_and_seeded() -> None:
    assert load_suite(["trec6", "sms_spam"]) == load_suite(["trec6", "sms_spam"])
    task = load_task("trec6")
    a = split_task(task, SplitConfig(test_size=50, calibration_size=10, train_size=20, seed=0))
    b = split_task(task, SplitConfig(test_size=50, calibration_size=10, train_size=20, seed=1))
    assert a.test.texts != b.test.texts
    # The train split is a prefix of the remaining shuffled order: a smaller train_size is a subset.
    c = split_task(task, SplitConfig(test_size=50, calibration_size=10, train_size=5, seed=0))
    assert c.train.texts == a.train.texts[:5] and c.test == a.test


def test_task_list_uses_given_or_default_split() -> None:
    assert resolve_suite(["bbc_news"]).split == SplitConfig()
    small = SplitConfig(test_size=10, calibration_size=0, train_size=10)
    assert resolve_suite("tiny", small).split == small
    assert resolve_suite("tiny", small).tasks == SUITES["tiny"].tasks
    assert resolve_suite(SUITES["text6"], small) == SuiteConfig(tasks=SUITES["text6"].tasks, split=small)
    assert [s.name for s in load_suite(SUITES["tiny"], small)] == list(SUITES["tiny"].tasks)


def test_unknown_names_are_refused_listing_the_known_ones() -> None:
    with pytest.raises(ValidationError, match="unknown task 'imdb'; known tasks: sms_spam, trec6"):
        resolve_suite(["sms_spam", "imdb"])
    with pytest.raises(ValueError, match="unknown suite 'text8'; known suites: tiny, starter, text6"):
        resolve_suite("text8")
    with pytest.raises(ValueError, match="known tasks"):
        load_task("imdb")


def test_bad_suite_and_split_configs_name_the_field() -> None:
    with pytest.raises(ValidationError, match="listed more than once: trec6"):
        SuiteConfig(tasks=("trec6", "sms_spam", "trec6"))
    with pytest.raises(ValidationError, match="tasks"):
        SuiteConfig(tasks=())
    with pytest.raises(ValidationError, match="test_size"):
        SplitConfig(test_size=0)
    with pytest.raises(ValidationError, match="train_sise"):
        SplitConfig(train_sise=10)  # type: ignore[call-arg]


def test_split_refuses_a_task_too_small() -> None:
    task = Task("toy", ("a", "b"), ("x", "y", "z"), (0, 1, 0))
    with pytest.raises(ValueError, match="'toy' has 3 examples"):
        split_task(task, SplitConfig(test_size=2, calibration_size=1, train_size=5))


def test_task_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match=r"label ids \[2\] outside 0..1"):
        Task("toy", ("a", "b"), ("x",), (2,))
    with pytest.raises(ValueError, match="1 texts but 2 labels"):
        Task("toy", ("a", "b"), ("x",), (0, 1))
