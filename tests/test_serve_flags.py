"""`reprmerge serve` flags come from the settings model: every setting has one, and they parse into the settings."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from reprmerge_cli import build_parser
from reprmerge_cli.serve_cmd import settings_overrides
from service.settings import ServiceSettings


def _serve_parser() -> argparse.ArgumentParser:
    parser = build_parser("serve")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def test_every_setting_has_a_flag_with_its_description() -> None:
    options = {a.dest: a for a in _serve_parser()._actions if a.option_strings}
    for name, field in ServiceSettings.model_fields.items():
        if name == "bundle":
            continue  # the positional argument
        assert f"--{name.replace('_', '-')}" in options[name].option_strings, name
        assert field.description and field.description in (options[name].help or "").replace("%%", "%"), name
    assert set(options) - set(ServiceSettings.model_fields) == {"help", "log_level"}  # no flag without a setting


def test_flags_parse_into_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REPRMERGE_API_KEY", raising=False)
    args = build_parser("serve").parse_args([
        "serve", str(tmp_path), "--drain-timeout", "7.5", "--max-preferences", "3", "--no-trace-backbone",
        "--device", "cpu", "--api-key", "k3y", "--preference-grid", "20", "--port", "0"])
    settings = ServiceSettings(**settings_overrides(args))
    assert settings.bundle == tmp_path and settings.drain_timeout == 7.5 and settings.max_preferences == 3
    assert settings.trace_backbone is False and settings.device == "cpu" and settings.preference_grid == 20
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "k3y" and settings.port == 0
    # a flag left out stays unset, so the environment (then the default) decides
    assert "max_inputs" not in settings_overrides(args) and settings.max_inputs == 32


def test_a_choice_outside_the_settings_literal_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser("serve").parse_args(["serve", "b", "--solve-dtype", "float16"])
    assert "--solve-dtype: invalid choice: 'float16'" in capsys.readouterr().err
