"""A model's chat template, rendered so that what the messages say stays text.

transformers renders the template to one string and tokenizes it with special tokens
parsed, so `<|im_start|>system` typed in a user message becomes the real control token
(role injection). Here the template is rendered twice: with the contents, and with each
content replaced by a marker that cannot occur in either. Splitting the marked rendering
at the markers gives the template's own text and where each content lands; when putting
the contents back gives exactly the first rendering, special tokens are looked for in the
template's text only. The result is a list of parts: structural special tokens, and runs
of text between them that the tokenizer must encode with special-token parsing off. For
contents without special-token text the ids equal transformers' (the tokenizer splits at
special tokens before anything else, so each run is encoded as it would be there).

A template that changes contents (trims them, say) is tried once more with stripped
contents; one that still cannot be split falls back to the one-string rendering, which is
exact only while no content holds special-token text: such a request is refused naming
the content.
"""

from __future__ import annotations

import enum
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pdserve.protocol import InvalidField


class Kind(enum.Enum):
    SPECIAL = "special"  # one structural special token, by its text
    TEXT = "text"  # encode with special-token parsing off
    RENDERED = "rendered"  # the fallback: the whole rendering, special tokens parsed


@dataclass(frozen=True)
class Part:
    text: str
    kind: Kind


@dataclass(frozen=True)
class SpecialToken:
    content: str
    lstrip: bool = False  # the token swallows whitespace on its left (tokenizers' flag)
    rstrip: bool = False
    single_word: bool = False


class ChatTemplate:
    """Renders conversations (`add_generation_prompt`) the way transformers does, in a
    jinja2 sandbox. `variables` are the template's globals (bos_token, eos_token).
    Raises InvalidField (`messages`, `messages[i].content`) for what it refuses."""

    def __init__(self, source: str, special: Sequence[SpecialToken],
                 variables: dict[str, str]):
        self._template = _compile(source)
        self._variables = dict(variables)
        self._special = {t.content: t for t in special}
        self._special_re = _alternation(special)
        # a private-use character and a secret: no template and no client can produce it
        self._marker = f"\ue000{secrets.token_hex(8)}"
        self._marker_re = re.compile(re.escape(self._marker) + r"(\d+)\ue001")

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=True,
                                         **self._variables)
        except jinja2.TemplateError as e:
            raise InvalidField("messages", f"the chat template rejected them: {e}") from e
        except Exception as e:  # noqa: BLE001 - the template's code failed on these messages
            # the exception's text (the template's internals) stays inside
            raise InvalidField("messages", f"the chat template failed on them "
                                           f"({type(e).__name__})") from e

    def parts(self, messages: Sequence[dict[str, str]]) -> list[Part]:
        """The rendering as structural special tokens and text runs."""
        real = self.render(messages)
        contents = [m["content"] for m in messages]
        marked = [{**m, "content": f"{self._marker}{i}\ue001"} for i, m in enumerate(messages)]
        try:
            template = self.render(marked)
        except InvalidField:
            template = None
        for fill in (contents, [c.strip() for c in contents]):
            if template is not None:
                pieces = self._split(template, fill)
                if "".join(text for text, _ in pieces) == real:
                    return self._tokenize_template(pieces)
        for i, content in enumerate(contents):
            found = self._special_re.search(content) if self._special_re else None
            if found:
                raise InvalidField(f"messages[{i}].content",
                                   f"holds the special token {found.group(0)!r}, which this "
                                   "model's chat template cannot keep as text")
        return [Part(real, Kind.RENDERED)]

    def _split(self, template: str, contents: list[str]) -> list[tuple[str, bool]]:
        """(text, is_content) pieces of the marked rendering, contents put back."""
        pieces: list[tuple[str, bool]] = []
        at = 0
        for m in self._marker_re.finditer(template):
            pieces.append((template[at:m.start()], False))
            pieces.append((contents[int(m.group(1))], True))
            at = m.end()
        pieces.append((template[at:], False))
        return pieces

    def _tokenize_template(self, pieces: list[tuple[str, bool]]) -> list[Part]:
        parts: list[Part] = []
        run: list[str] = []

        def close_run():
            if run:
                parts.append(Part("".join(run), Kind.TEXT))
                run.clear()

        for text, is_content in pieces:
            if is_content or self._special_re is None:
                run.append(text)
                continue
            at = 0
            for m in self._special_re.finditer(text):
                run.append(text[at:m.start()])
                close_run()
                parts.append(Part(m.group(0), Kind.SPECIAL))
                at = m.end()
            run.append(text[at:])
        close_run()
        return self._strip_around_specials(parts)

    def _strip_around_specials(self, parts: list[Part]) -> list[Part]:
        """Whitespace that a token's lstrip/rstrip swallows (as the tokenizer would)."""
        texts = [p.text for p in parts]
        for i, p in enumerate(parts):
            if p.kind is not Kind.SPECIAL:
                continue
            token = self._special[p.text]
            if token.lstrip and i > 0 and parts[i - 1].kind is Kind.TEXT:
                texts[i - 1] = texts[i - 1].rstrip()
            if token.rstrip and i + 1 < len(parts) and parts[i + 1].kind is Kind.TEXT:
                texts[i + 1] = texts[i + 1].lstrip()
        return [Part(t, p.kind) for t, p in zip(texts, parts, strict=True)
                if t or p.kind is Kind.SPECIAL]


def _compile(source: str) -> jinja2.Template:
    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def _alternation(special: Sequence[SpecialToken]) -> re.Pattern | None:
    """Leftmost, longest first: how the tokenizer finds its added tokens."""
    if not special:
        return None
    alternatives = []
    for t in sorted(special, key=lambda t: len(t.content), reverse=True):
        token = re.escape(t.content)
        alternatives.append(rf"(?<!\w){token}(?!\w)" if t.single_word else token)
    return re.compile("|".join(alternatives))
