"""The `pdserve` command line."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pdserve.deploy.cli import main


def test_help_explains_every_command():
    out = subprocess.run([sys.executable, "-m", "pdserve", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for word in ("chat", "convert", "models", "disaggregated"):
        assert word in out


def test_models_lists_the_builtin(capsys):
    assert main(["models"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out


def test_bad_model_is_a_clear_error(capsys, tmp_path):
    assert main(["chat", "--model", str(tmp_path / "nope"), "hi"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["convert", "gpt-17"]) == 2
    assert "unknown built-in model 'gpt-17'" in capsys.readouterr().err


@pytest.mark.slow
def test_chat_answers_with_the_builtin_model(capsys):
    assert main(["chat", "--max-tokens", "16", "What is the capital of France?"]) == 0
    assert "Paris" in capsys.readouterr().out
