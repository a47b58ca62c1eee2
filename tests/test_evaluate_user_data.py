"""`reprmerge evaluate --test`: a bundle calibrated from experts this test fine-tunes, scored on the user's files.

Every number is checked against a computation that shares nothing with the product but the files:
transformers forward passes, mean pooling and a float64 numpy correction from the method's formulas.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from reprmerge_core.bundle import load_bundle
from reprmerge_cli import main as cli
from reprmerge_core.data import SplitConfig, Task, TaskSplits
from reprmerge_core.data.files import label_index, read_labelled
from reprmerge_core.evaluation.metrics import simplex_grid
from reprmerge_core.training import TrainRecipe, train_expert

MAX_LENGTH = 16
WORDS = {
    "spam": {"ham": "meeting lunch later home tomorrow mum call dinner",
             "spam": "win prize free cash claim urgent offer txt"},
    "topic": {"sport": "goal match team score league coach", "food": "pizza soup bread cheese recipe oven",
              "tech": "laptop phone code chip software screen"},
}
FILL = "the a and of to it is was for on with this that we you".split()
# Embeddings train too: the tiny random BERT's frozen token space does not separate keywords (measured: chance).
RECIPE = TrainRecipe(learning_rate=3e-3, batch_size=16, epochs=4, max_length=MAX_LENGTH, freeze_embeddings=False,
                     warmup_fraction=0.0)


def make_task(task: str, n: int, seed: int) -> Task:
    """Two keywords of the class among four filler words; 15% of labels redrawn, so no head is perfect."""
    rng = random.Random(seed)
    labels = list(WORDS[task])
    texts, ys = [], []
    for _ in range(n):
        y = rng.randrange(len(labels))
        words = rng.sample(WORDS[task][labels[y]].split(), 2) + rng.sample(FILL, 4)
        rng.shuffle(words)
        if rng.random() < 0.15:
            y = rng.randrange(len(labels))
        texts.append(" ".join(words))
        ys.append(y)
    return Task(task, tuple(labels), tuple(texts), tuple(ys))


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory, tiny_backbone_dir: Path) -> dict[str, Path]:
    """Experts fine-tuned here from the tiny BERT, merged and calibrated with the CLI, and the user's test files."""
    root = tmp_path_factory.mktemp("user-eval")
    paths: dict[str, Path] = {"root": root, "base": tiny_backbone_dir}
    calibrate = ["calibrate", "--backbone", str(root / "merged"), "--out", str(root / "bundle"), "--folds", "3",
                 "--max-length", str(MAX_LENGTH)]
    merge = ["merge", "--base", str(tiny_backbone_dir), "--method", "task_arithmetic", "--set", "lambda=0.5",
             "--out", str(root / "merged")]
    for i, task in enumerate(WORDS):
        splits = TaskSplits(make_task(task, 96, i), make_task(task, 48, 20 + i).texts, make_task(task, 40, 10 + i),
                            SplitConfig())
        expert = train_expert(splits, RECIPE, task_index=i, base=tiny_backbone_dir, cache_dir=root / "cache",
                              device="cpu", progress=False)
        paths[task] = expert.path
        (root / f"{task}.txt").write_text("\n".join(splits.calibration) + "\n")
        merge += ["--expert", f"{task}={expert.path}"]
        calibrate += ["--expert", f"{task}={expert.path}", "--calibration", f"{task}={root / f'{task}.txt'}"]
    assert cli(merge) == 0
    assert cli(calibrate) == 0
    # the user's files: spam as CSV with label names (a comma inside a quoted text), topic as JSON lines with ids
    spam, topic = make_task("spam", 40, 10), make_task("topic", 40, 11)
    with (root / "spam.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "message", "label"])
        for i, (text, y) in enumerate(zip(spam.texts, spam.labels)):
            writer.writerow([i, text.replace(" ", ", ", 1) if i % 5 == 0 else text, spam.label_names[y]])
    (root / "topic.jsonl").write_text("".join(json.dumps({"message": t, "label": y}) + "\n"
                                              for t, y in zip(topic.texts, topic.labels)))
    return paths


def features(checkpoint: Path, texts: list[str]) -> np.ndarray:
    """Mean-pooled last hidden states from transformers itself, float64."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModel.from_pretrained(checkpoint).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.double()
    mask = batch["attention_mask"].unsqueeze(-1).double()
    return ((hidden * mask).sum(1) / mask.sum(1)).numpy()


def head(checkpoint: Path) -> tuple[np.ndarray, np.ndarray]:
    from safetensors.numpy import load_file

    tensors = load_file(str(checkpoint / "head.safetensors"))
    return tensors["weight"].astype(np.float64), tensors["bias"].astype(np.float64)


def corrections(merged: list[np.ndarray], experts: list[np.ndarray], beta: float,
                identity_weight: float) -> tuple[list[np.ndarray], ...]:
    """M_t and C_t of method.md in float64: energy-normalised statistics, prior O_t = a I + (1 - a) P_t with P_t
    the Procrustes rotation (with its tie-break) and a the bundle's identity weight."""
    Ms, Cs = [], []
    for zm, ze in zip(merged, experts):
        d = zm.shape[1]
        scale = np.trace(zm.T @ zm) / d
        A, B = zm.T @ zm / scale, ze.T @ zm / scale
        tie = 1e-6 * np.linalg.svd(B, compute_uv=False).sum() / d
        U, _, Vt = np.linalg.svd(B + tie * np.eye(d))
        Ms.append(B + beta * (identity_weight * np.eye(d) + (1 - identity_weight) * U @ Vt))
        Cs.append(A + beta * np.eye(d))
    return Ms, Cs


def accuracy(z: np.ndarray, W: np.ndarray, H: tuple[np.ndarray, np.ndarray], labels: list[int]) -> float:
    logits = z @ W.T @ H[0].T + H[1]
    return float((logits.argmax(1) == np.array(labels)).mean())


def test_evaluate_on_user_files_matches_an_independent_computation(
    user: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    root = user["root"]
    assert cli(["evaluate", str(root / "bundle"), "--test", f"spam={root / 'spam.csv'}",
                "--test", f"topic={root / 'topic.jsonl'}", "--text-column", "message",
                "--expert", f"spam={user['spam']}", "--expert", f"topic={user['topic']}", "--base", str(user["base"]),
                "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["tasks"] == ["spam", "topic"] and report["test_examples"] == [40, 40]

    # the user's files, read without the product
    with (root / "spam.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    texts = {"spam": [r["message"] for r in rows], "topic": []}
    labels = {"spam": [["ham", "spam"].index(r["label"]) for r in rows], "topic": []}
    for line in (root / "topic.jsonl").read_text().splitlines():
        texts["topic"].append(json.loads(line)["message"])
        labels["topic"].append(json.loads(line)["label"])

    heads = [head(user[t]) for t in WORDS]
    expert_acc = [accuracy(features(user[t], texts[t]), np.eye(32), h, labels[t]) for t, h in zip(WORDS, heads)]
    assert report["experts"]["accuracy"] == pytest.approx(expert_acc, abs=1e-6)
    assert 0.6 < min(expert_acc) and max(expert_acc) < 1.0  # learnt, and not trivially perfect

    cal = [(root / f"{t}.txt").read_text().splitlines() for t in WORDS]
    Ms, Cs = corrections([features(root / "merged", c) for c in cal],
                         [features(user[t], c) for t, c in zip(WORDS, cal)], report["beta"],
                         report["prior"]["identity_weight"] if "prior" in report else 0.0)  # 0: Procrustes
    merged_test = [features(root / "merged", texts[t]) for t in WORDS]
    one_hot = [accuracy(merged_test[t], Ms[t] @ np.linalg.inv(Cs[t]), heads[t], labels[name])
               for t, name in enumerate(WORDS)]
    assert report["one_hot"]["accuracy"] == pytest.approx(one_hot, abs=1e-6)
    assert report["one_hot"]["normalised"] == pytest.approx(np.array(one_hot) / expert_acc, abs=1e-6)
    W_equal = (Ms[0] + Ms[1]) @ np.linalg.inv(Cs[0] + Cs[1])
    equal = [accuracy(merged_test[t], W_equal, heads[t], labels[name]) for t, name in enumerate(WORDS)]
    assert report["scenarios"]["equal"]["accuracy"] == pytest.approx(equal, abs=1e-6)
    merged = [accuracy(merged_test[t], np.eye(32), heads[t], labels[name]) for t, name in enumerate(WORDS)]
    assert report["scenarios"]["merged"]["accuracy"] == pytest.approx(merged, abs=1e-6)

    # the edge spam -> topic runs from one one-hot preference to the other through the equal one
    edge = report["edges"][0]
    assert edge["tasks"] == ["spam", "topic"] and len(edge["weight"]) == 11
    assert edge["accuracy"][0][0] == pytest.approx(one_hot[0]) and edge["accuracy"][-1][1] == pytest.approx(one_hot[1])
    assert edge["accuracy"][5] == pytest.approx(equal)
    # task arithmetic at a one-hot preference is that expert itself
    grid = np.array(report["grid"]["preferences"])
    ta = np.array(report["grid"]["task_arithmetic"]["normalised"])
    assert ta[(grid == [1, 0]).all(1), 0] == pytest.approx(1.0) and ta[(grid == [0, 1]).all(1), 1] == pytest.approx(1.0)

    assert {"report.md", "report.json", "pareto.png", "scenarios.png", "edges.png", "beta_sweep.png"} <= {
        p.name for p in out.iterdir()}
    assert "simplex" not in report  # a simplex map needs three tasks
    assert f"| spam | {report['majority'][0]:.3f} | {expert_acc[0]:.3f}" in printed
    assert "preference-weighted task arithmetic" in printed


def test_evaluate_without_experts_reports_plain_accuracy_and_a_simplex_map(
    random_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three tasks, no --expert: normalised figures are accuracies; the simplex map marks its Pareto front."""
    bundle = load_bundle(random_bundle)
    rng = random.Random(0)
    for task in bundle.manifest.tasks:
        rows = [{"text": f"sample {i} about {rng.choice(FILL)}", "gold": rng.choice(task.labels)} for i in range(12)]
        (tmp_path / f"{task.name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report"
    tests = [a for t in bundle.task_names for a in ("--test", f"{t}={tmp_path / f'{t}.jsonl'}")]
    assert cli(["evaluate", str(random_bundle), "--out", str(out), "--label-column", "gold", "--no-baseline",
                *tests]) == 0
    assert "No experts given" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["experts"] is None and report["normalised_by"] == "none"
    assert report["one_hot"]["normalised"] == report["one_hot"]["accuracy"]
    simplex = report["simplex"]
    assert simplex["preferences"] == simplex_grid(3, 20).tolist()
    # Pareto front by brute force: no other point at least as good everywhere and better somewhere
    pts = np.array(simplex["normalised"])
    dominated = [any((q >= p).all() and (q > p).any() for q in pts) for p in pts]
    assert simplex["pareto"] == [not d for d in dominated]
    assert [e["tasks"] for e in report["edges"]] == [["alpha", "beta"], ["alpha", "gamma"], ["beta", "gamma"]]
    # an edge's ends are the simplex map's corners
    corner = {tuple(p): row for p, row in zip(simplex["preferences"], simplex["accuracy"])}
    assert report["edges"][1]["accuracy"][0] == pytest.approx(corner[1.0, 0.0, 0.0])
    assert report["edges"][1]["accuracy"][-1] == pytest.approx(corner[0.0, 0.0, 1.0])
    assert {"simplex.png", "edges.png"} <= {p.name for p in out.iterdir()}

    assert cli(["evaluate", str(random_bundle), "--out", str(tmp_path / "one-edge"), "--label-column", "gold",
                "--no-baseline", "--edge", "gamma:alpha", *tests]) == 0
    assert [e["tasks"] for e in json.loads((tmp_path / "one-edge" / "report.json").read_text())["edges"]] == [
        ["gamma", "alpha"]]
    assert cli(["evaluate", str(random_bundle), "--out", str(tmp_path / "never"), "--edge", "gamma:gamma", *tests]) == 2
    assert "--edge 'gamma:gamma': expected A:B with two different tasks" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("spam_file", "content", "message"),
    [
        ("spam.csv", "message,label\nwin cash now,spam\nlunch at noon,HAM\nfree prize,junk\n",
         "spam.csv:4: unknown label 'junk' for task 'spam'; allowed: ham, spam, or ids 0-1"),
        ("spam.csv", "message,label\nwin cash now,spam,extra\n", "spam.csv:2: 3 fields, the header has 2"),
        ("spam.csv", "text,label\nwin cash now,spam\n", "spam.csv:1: no column 'message' in the header row"),
        ("spam.jsonl", '{"message": "hi", "label": "ham"}\n\n{"message": "x", "label": \n',
         "spam.jsonl:3: not a JSON line"),
        ("spam.jsonl", '{"message": "", "label": "ham"}\n', "spam.jsonl:1: field 'message' must be a non-empty string"),
        ("spam.jsonl", '{"message": "hi", "label": 2}\n', "unknown label 2"),
        ("spam.txt", "hi\n", "unknown file type '.txt'; use .csv, .tsv or .jsonl"),
    ],
)
def test_bad_user_files_are_refused_naming_file_and_line(
    user: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], spam_file: str, content: str,
    message: str,
) -> None:
    root = user["root"]
    (tmp_path / spam_file).write_text(content)
    assert cli(["evaluate", str(root / "bundle"), "--test", f"spam={tmp_path / spam_file}", "--text-column", "message",
                "--test", f"topic={root / 'topic.jsonl'}", "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "never").exists()


def test_tasks_and_experts_must_match_the_bundle(user: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root = user["root"]
    args = ["evaluate", str(root / "bundle"), "--out", str(tmp_path / "never"), "--text-column", "message",
            "--test", f"spam={root / 'spam.csv'}"]
    assert cli(args) == 2
    assert "--test is needed for every task of the bundle; missing ['topic']" in capsys.readouterr().err
    assert cli([*args, "--test", f"topics={root / 'topic.jsonl'}"]) == 2
    assert "--test names unknown tasks ['topics']" in capsys.readouterr().err
    full = [*args, "--test", f"topic={root / 'topic.jsonl'}"]
    assert cli([*full, "--expert", f"spam={user['topic']}", "--expert", f"topic={user['spam']}"]) == 2
    assert "expert 'spam'" in capsys.readouterr().err  # a 3-class head where the bundle's task has 2 labels
    assert cli([*full, "--base", str(user["base"])]) == 2
    assert "needs --expert" in capsys.readouterr().err
    assert cli([*full, "--sweep-calibration"]) == 2
    assert "not with --test" in capsys.readouterr().err
    assert cli(["evaluate", str(root / "bundle"), "--out", str(tmp_path / "never"),
                "--expert", f"spam={user['spam']}"]) == 2
    assert "--expert and --base go with --test" in capsys.readouterr().err
    assert cli(["evaluate", str(root / "bundle"), "--out", str(tmp_path / "never")]) == 2
    assert "not built from a built-in suite" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_label_matching() -> None:
    assert label_index("spam", ["ham", "spam"]) == 1 and label_index(" SPAM ", ["ham", "spam"]) == 1
    assert label_index(1, ["ham", "spam"]) == 1 and label_index("0", ["ham", "spam"]) == 0
    assert label_index(2, ["ham", "spam"]) is None and label_index(True, ["ham", "spam"]) is None
    # names that are numbers other than their own id make ids ambiguous: only names count
    assert label_index("1", ["5", "1"]) == 1 and label_index("0", ["5", "1"]) is None
    assert label_index("1", ["0", "1"]) == 1  # names equal to their ids: either reading agrees


def test_read_labelled_tsv_with_multiline_quoted_text(tmp_path: Path) -> None:
    path = tmp_path / "data.tsv"
    path.write_text('text\tlabel\n"two\nlines"\tpos\n\nplain\t0\nbad\tmaybe\n')
    with pytest.raises(ValueError, match=r"data.tsv:6: unknown label 'maybe'"):
        read_labelled(path, "sentiment", ["neg", "pos"])
    path.write_text('text\tlabel\n"two\nlines"\tpos\n\nplain\t0\n')
    task = read_labelled(path, "sentiment", ["neg", "pos"])
    assert task.texts == ("two\nlines", "plain") and task.labels == (1, 0)
