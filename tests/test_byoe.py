"""The README's "Bring your own experts" walk-through, run as written against a tiny base.

The marked shell block runs in a temporary folder with `BASE` (the tiny random BERT) and `TRAIN` (fewer training
texts) set, the variables it reads with defaults; then the marked `reprmerge serve` line starts a real server and
the marked curl request goes to it over HTTP. Its answer must equal the ONNX model the walk-through exported at the
same preference, run by onnxruntime.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnxruntime
from transformers import AutoConfig, AutoTokenizer

from reprmerge_bench.server import CLI, LocalServer

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("sms_spam", "trec6", "movie_sentiment")


def marked_block(name: str) -> str:
    """The fenced block right after `<!-- test_byoe: NAME -->` in the README."""
    match = re.search(rf"<!-- test_byoe: {name} -->\n```\w*\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert match, f"README.md has no block marked <!-- test_byoe: {name} -->"
    return match.group(1)


def shims(folder: Path) -> Path:
    """`python` and `reprmerge` as a user with the project's venv active has them."""
    folder.mkdir()
    for name, command in (("python", f"exec {shlex.quote(sys.executable)} \"$@\""),
                          ("reprmerge", f"exec {shlex.quote(sys.executable)} -c {shlex.quote(CLI)} \"$@\"")):
        (folder / name).write_text(f"#!/bin/sh\n{command}\n")
        (folder / name).chmod(0o755)
    return folder


def curl_request(block: str) -> tuple[str, dict[str, object]]:
    """The route and JSON body of the block's one `curl ... URL ... -d BODY` command."""
    words = shlex.split(block.replace("\\\n", " "))
    assert words[0] == "curl", words
    url = next(w for w in words if w.startswith("localhost:"))
    return url.partition("/")[2], json.loads(words[words.index("-d") + 1])


def test_bring_your_own_experts_walkthrough(tmp_path: Path, tiny_backbone_dir: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "BASE": str(tiny_backbone_dir), "TRAIN": "48", "HF_HUB_OFFLINE": "1",
           "PATH": f"{shims(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", marked_block("walk-through")], cwd=work, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-6000:]}"

    # Three HF experts with label names, a TIES bundle that records its recipe, a report, an ONNX model.
    labels = {t: AutoConfig.from_pretrained(work / "experts" / t).id2label for t in TASKS}
    assert labels["sms_spam"] == {0: "ham", 1: "spam"} and len(labels["trec6"]) == 6
    manifest = json.loads((work / "bundles/mine/manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == list(TASKS)
    assert [t["labels"] for t in manifest["tasks"]] == [list(labels[t].values()) for t in TASKS]
    assert manifest["merge"]["method"] == "ties" and manifest["merge"]["parameters"]["density"] == 0.2
    assert "ties" in run.stdout and "density" in run.stdout  # `reprmerge inspect` shows the merge
    assert (work / "reports/mine/report.md").is_file()
    exported = work / "exported"
    export_info = json.loads((exported / "export.json").read_text())

    serve = shlex.split(marked_block("serve"))
    assert serve[:2] == ["reprmerge", "serve"], serve
    route, body = curl_request(marked_block("request"))
    with LocalServer(work / serve[2], None) as server:
        response = httpx.post(f"{server.url}/{route}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    texts = body["texts"]
    assert isinstance(texts, list) and len(result["predictions"]) == len(texts)
    assert result["preference"] == export_info["preference"]  # the README exports the preference it asks for

    # The exported model, run by onnxruntime alone, gives the service's probabilities.
    tokenizer = AutoTokenizer.from_pretrained(exported)
    session = onnxruntime.InferenceSession(str(exported / export_info["model"]), providers=["CPUExecutionProvider"])
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="np")
    outputs = session.run(None, {name: batch[name].astype(np.int64) for name in export_info["inputs"]})
    for task, logits in zip(TASKS, outputs, strict=True):
        expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        for row, answer in zip(expected, result["predictions"], strict=True):
            names = list(labels[task].values())
            assert list(answer[task]["probabilities"]) == names
            np.testing.assert_allclose(list(answer[task]["probabilities"].values()), row, atol=1e-4)
            assert answer[task]["label"] == names[int(row.argmax())]
