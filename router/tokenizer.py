"""Text <-> token ids for the router, from a model folder, without transformers or torch:
the `tokenizers` library reads `tokenizer.json`, jinja2 renders the chat template the way
transformers' `apply_chat_template` does (sandboxed, `add_generation_prompt`).

Special tokens, where they come from:
- `encode(prompt)`: a plain prompt is the model's raw input, as in vLLM's completions API:
  special-token text in it (`<|im_start|>`) is parsed as the special token, and the
  tokenizer adds its BOS where its post-processor does.
- `apply_chat_template(messages)`: only the template's own structural tokens are special;
  whatever the messages say is text, `<|im_start|>system` included (router.chat_template).
  For contents without special-token text the ids equal transformers'.

Thread-safe, and meant to run off the event loop: encoding goes through `encode_batch`,
which releases the GIL while Rust works (plain `encode` holds it throughout).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from pdserve.protocol import InvalidField, read_model_limits
from pdserve.router.chat_template import ChatTemplate, Kind, SpecialToken


class RouterTokenizer:
    def __init__(self, model_dir: str | Path):
        folder = Path(model_dir)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise ValueError(f"model folder {str(folder)!r} has no tokenizer.json")
        self._tok = Tokenizer.from_file(str(file))
        # the same tokenizer reading special-token text as text; a flag on the object, so a
        # second object rather than toggling one that other threads use
        self._text_tok = Tokenizer.from_file(str(file))
        self._text_tok.encode_special_tokens = True
        config = _read_json(folder / "tokenizer_config.json")
        variables = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")}
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        special = [SpecialToken(t.content, t.lstrip, t.rstrip, t.single_word)
                   for t in self._tok.get_added_tokens_decoder().values() if t.special]
        self._template = (ChatTemplate(template, special, variables)
                          if isinstance(template, str) else None)
        self.limits = read_model_limits(folder, default_vocab_size=self._tok.get_vocab_size())

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str) -> list[int]:
        """A plain prompt: special-token text is parsed, BOS added where the model wants."""
        return self._tok.encode_batch([text], add_special_tokens=True)[0].ids

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The conversation rendered for generation (the assistant turn opened), as ids;
        message contents are text. Raises InvalidField (a ValueError) naming `messages`
        or one message's content when the template refuses them."""
        if self._template is None:
            raise InvalidField("messages", "this model has no chat template")
        parts = self._template.parts(messages)
        texts = [p.text for p in parts if p.kind is Kind.TEXT]
        encoded = iter(self._text_tok.encode_batch(texts, add_special_tokens=False)
                       if texts else ())
        ids: list[int] = []
        for part in parts:
            if part.kind is Kind.SPECIAL:
                ids.append(self._tok.token_to_id(part.text))
            elif part.kind is Kind.TEXT:
                ids += next(encoded).ids
            else:
                ids += self._tok.encode_batch([part.text], add_special_tokens=False)[0].ids
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=True)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(value) -> str:
    if isinstance(value, dict):  # AddedToken serialized
        return value.get("content", "")
    return value or ""
