"""The `reprmerge` command itself, across subcommands: Ctrl-C, `--help` defaults, quiet model loads, what `inspect`
explains."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from reprmerge_bench.server import CLI, LocalServer
from reprmerge_cli import COMMANDS, build_parser
from reprmerge_cli import main as cli
from service.settings import ServiceSettings
from tests.helpers import TOKENIZER_FILES, make_random_bundle


def _interrupted(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """SIGINT (what Ctrl-C sends) to a running `reprmerge`; its exit status and output."""
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


def test_ctrl_c_while_reading_inputs_exits_130_with_one_line(tmp_path: Path, tiny_backbone_dir: Path) -> None:
    """A real process blocked reading its calibration file (a FIFO nobody writes) when SIGINT arrives."""
    fifo = tmp_path / "cal.txt"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, "calibrate", "--backbone", str(tiny_backbone_dir), "--expert",
         f"a={tiny_backbone_dir}", "--calibration", f"a={fifo}", "--out", str(tmp_path / "bundle")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    writer, deadline = None, time.monotonic() + 120
    try:
        while writer is None:  # opening the write end succeeds once the command has opened the FIFO to read it
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                assert exc.errno == errno.ENXIO
                time.sleep(0.05)
        code, out = _interrupted(proc)
    finally:
        if writer is not None:
            os.close(writer)
        if proc.poll() is None:
            proc.kill()
    assert code == 130, out
    assert out == "interrupted\n"
    assert not (tmp_path / "bundle").exists()


def test_ctrl_c_stops_serve_after_its_drain_with_130(random_bundle: Path, tmp_path: Path) -> None:
    """`serve` handles SIGINT itself (a drain, as for SIGTERM), then exits like every other command."""
    server = LocalServer(random_bundle, tmp_path / "serve.log", "--device", "cpu", ready_timeout=90)
    with server:
        assert server.proc is not None
        server.proc.send_signal(signal.SIGINT)
        code = server.proc.wait(timeout=60)
    log = (tmp_path / "serve.log").read_text()
    assert code == 130, log
    assert "draining" in log and log.endswith("interrupted\n") and "Traceback" not in log, log


def test_expert_loads_print_no_transformers_load_reports(tmp_path: Path, tiny_backbone_dir: Path) -> None:
    """An encoder read from a sequence-classification checkpoint leaves its head out, as it should: transformers
    would print a LOAD REPORT table (and a progress bar) for every such load."""
    config = BertConfig.from_pretrained(tiny_backbone_dir, num_labels=2)
    expert = tmp_path / "expert"
    BertForSequenceClassification(config).save_pretrained(expert)
    for name in TOKENIZER_FILES:
        if (tiny_backbone_dir / name).exists():
            shutil.copy(tiny_backbone_dir / name, expert / name)
    texts = tmp_path / "cal.txt"
    texts.write_text("".join(f"input number {i}\n" for i in range(40)))
    done = subprocess.run(
        [sys.executable, "-c", CLI, "calibrate", "--backbone", str(tiny_backbone_dir), "--base", str(tiny_backbone_dir),
         "--expert", f"a={expert}", "--calibration", f"a={texts}", "--folds", "2", "--out", str(tmp_path / "bundle")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    assert done.returncode == 0, done.stderr
    assert "LOAD REPORT" not in done.stderr and "UNEXPECTED" not in done.stderr, done.stderr
    assert "Loading weights" not in done.stderr, done.stderr


def _options(parser: argparse.ArgumentParser, path: str = "") -> Iterator[tuple[str, argparse.ArgumentParser,
                                                                               argparse.Action]]:
    """(subcommand path, its parser, option) of every option under `parser`, nested subcommands included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{path} {name}".strip())
        elif action.option_strings and action.dest != "help":
            yield path, parser, action


def test_every_subcommand_help_shows_the_defaults() -> None:
    """Each option with a default says it in `--help`; `serve`'s flags (None, so the environment can fill
    them) say the settings' default and variable."""
    settings = ServiceSettings.model_fields
    checked = 0
    for name, _, _ in COMMANDS:
        for path, parser, action in _options(build_parser(name)):
            if path.split()[:1] != [name]:
                continue  # other subcommands are help-only here
            formatter = parser._get_formatter()
            formatter.add_argument(action)
            shown = " ".join(formatter.format_help().split())
            if name == "serve" and action.dest in settings:
                default = settings[action.dest].default
                assert f"REPRMERGE_{action.dest.upper()}" in shown, shown
                expected = None if default is None else f"default: {default}"
            else:
                default = action.default
                expected = None if default is None or default is False or default == [] else f"default: {default}"
            if expected is not None:
                assert expected in shown, (path, shown)
                checked += 1
    assert checked > 40


def test_inspect_explains_rho_beta_and_the_trade_off_losses(tmp_path: Path, tiny_backbone_dir: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    merged = Path(shutil.copytree(tiny_backbone_dir, tmp_path / "merged"))
    (merged / "merge_report.json").write_text(json.dumps({"method": "regmean", "rho": 0.875}))  # as `merge` writes
    bundle = make_random_bundle(tmp_path / "bundle", merged, torch.Generator().manual_seed(0))
    assert cli(["inspect", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "  rho       0.875: share of the experts' changes to layer outputs on calibration inputs" in out
    assert "  beta      the ridge of each task's correction W, which minimises |W z_m - z_e|^2" in out
    assert "`/v1/tradeoff` gives each task's loss L_t(W_p), its `best`" in out
    assert "quality_kept = (uncorrected - loss) / (uncorrected - best)" in out
