"""`vlmserve serve --help` documents every flag with an example; flags map onto the config dataclasses."""

from __future__ import annotations

import dataclasses

import pytest

from vlmserve.cli import build_parser, config_from_args
from vlmserve.config import SECTIONS, ConfigError


def test_serve_help_explains_every_config_field_with_an_example(capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # no line wrapping inside hyphenated flags
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for cls in SECTIONS.values():
        for field in dataclasses.fields(cls):
            if not field.metadata.get("positional"):
                flag = field.metadata.get("flag") or "--" + field.name.replace("_", "-")
                assert flag in text, field.name
            assert f"Example: {' '.join(str(field.metadata['example']).split())}" in text, field.name


def test_flags_reach_the_config() -> None:
    args = build_parser().parse_args([
        "serve", "some/model", "--port", "9000", "--served-model-name", "a", "b", "--api-key", "k1", "k2",
        "--no-enable-prefix-caching", "--max-num-seqs", "8", "--allowed-media-hosts", "10.0.0.1", "--trust-remote-code"])
    config = config_from_args(args)
    assert config.model.model == "some/model" and config.model.served_model_name == ("a", "b")
    assert config.model.trust_remote_code and config.server.port == 9000 and config.server.api_key == ("k1", "k2")
    assert not config.engine.enable_prefix_caching and config.engine.max_num_seqs == 8
    assert config.media.allowed_media_hosts == ("10.0.0.1",)


def test_invalid_values_are_refused_with_the_flag_named() -> None:
    with pytest.raises(ConfigError, match="--max-num-seqs"):
        config_from_args(build_parser().parse_args(["serve", "--max-num-seqs", "0"]))
