"""Text <-> token ids for the router, from a model folder, without transformers or torch:
the `tokenizers` library reads `tokenizer.json`, jinja2 renders the chat template the way
transformers' `apply_chat_template` does (sandboxed, `add_generation_prompt`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from pdserve.protocol import read_model_limits


class RouterTokenizer:
    def __init__(self, model_dir: str | Path):
        folder = Path(model_dir)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise ValueError(f"model folder {str(folder)!r} has no tokenizer.json")
        self._tok = Tokenizer.from_file(str(file))
        config = _read_json(folder / "tokenizer_config.json")
        self._special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")}
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        self._template = _compile(template) if isinstance(template, str) else None
        self.limits = read_model_limits(folder, default_vocab_size=self._tok.get_vocab_size())

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The conversation rendered for generation (the assistant turn opened), as ids."""
        if self._template is None:
            raise ValueError("messages: this model has no chat template")
        try:
            text = self._template.render(messages=list(messages), add_generation_prompt=True,
                                         **self._special)
        except jinja2.TemplateError as e:
            raise ValueError(f"messages: the chat template rejected them: {e}") from e
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=True)


def _compile(template: str):
    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(value) -> str:
    if isinstance(value, dict):  # AddedToken serialized
        return value.get("content", "")
    return value or ""
