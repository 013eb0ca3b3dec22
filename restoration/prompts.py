"""Restoration prompts (SPIRE's grammar) and SUPIR's default quality prompts.

Grammar (DESIGN.md): the ops in the order they were applied, joined by "; ":
    Deblur with sigma 2.0 | Upsample to 4.0x | Denoise with sigma 0.06 | Dejpeg with quality 40
parameter-free forms Deblur, Upsample, Denoise, Dejpeg; the single-type phrases of other degradations
(Derain, Dehaze, Brighten, ...); blind: "Remove all degradation".

Each parameter has one printed precision (`PRECISION`); the degradation chains round their parameters with
`round_parameter` *before* applying them, so the numbers in a prompt are exactly the ones applied and
`parse(render(ops)) == ops`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BLIND_PROMPT = "Remove all degradation"
# SUPIR's default prompts: the positive one is appended to captions, the negative one drives CFG and the
# negative-quality training samples.
POSITIVE_QUALITY_PROMPT = (
    "Cinematic, High Contrast, highly detailed, taken using a Canon EOS R camera, hyper detailed photo - realistic "
    "maximum detail, 32k, Color Grading, ultra HD, extreme meticulous detailing, skin pore detailing, hyper sharpness, "
    "perfect without deformations."
)
NEGATIVE_QUALITY_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, CG Style, 3D render, unreal "
    "engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, jpeg artifacts, "
    "deformed, lowres, over-smooth"
)

# op name -> (verb, parameter phrase with {value}, decimals printed; None = integer)
_PARAMETERIZED = {
    "blur": ("Deblur", "with sigma {value}", 1),
    "downsample": ("Upsample", "to {value}x", 1),
    "noise": ("Denoise", "with sigma {value}", 2),
    "jpeg": ("Dejpeg", "with quality {value}", None),
}
PRECISION = {name: decimals for name, (_, _, decimals) in _PARAMETERIZED.items()}
_VERB_TO_OP = {verb: name for name, (verb, _, _) in _PARAMETERIZED.items()}


class PromptParseError(ValueError):
    """Text that is not in the restoration-prompt grammar."""


def round_parameter(op: str, value: float) -> float | int:
    """The value as the prompt prints it; chains apply this rounded value."""
    decimals = PRECISION[op]
    return round(value) if decimals is None else round(float(value), decimals)


@dataclass(frozen=True)
class PromptOp:
    """One restoration instruction: a parameterized op with its value (or None), or a free phrase."""

    op: str
    value: float | int | None = None

    def render(self) -> str:
        if self.op in _PARAMETERIZED:
            verb, phrase, decimals = _PARAMETERIZED[self.op]
            if self.value is None:
                return verb
            text = str(int(self.value)) if decimals is None else f"{self.value:.{decimals}f}"
            return f"{verb} {phrase.format(value=text)}"
        if self.value is not None:
            raise ValueError(f"phrase op {self.op!r} takes no value")
        return self.op


def render(ops: list[PromptOp]) -> str:
    """The restoration prompt for ops in the order applied; no ops means blind restoration."""
    return "; ".join(op.render() for op in ops) if ops else BLIND_PROMPT


_NUMBER = r"(?P<value>[0-9]+(?:\.[0-9]+)?)"
_PATTERNS = [
    (name, re.compile("^" + re.escape(f"{verb} {phrase}").replace(re.escape("{value}"), _NUMBER) + "$"))
    for name, (verb, phrase, _) in _PARAMETERIZED.items()
]
_PHRASE = re.compile(r"^[A-Z][a-z]+(?: [a-z]+)*$")


def parse(text: str) -> list[PromptOp]:
    """Inverse of `render`. Raises `PromptParseError` naming the part that does not parse."""
    text = text.strip()
    if text == BLIND_PROMPT:
        return []
    ops = []
    for part in text.split("; "):
        if part in _VERB_TO_OP:
            ops.append(PromptOp(_VERB_TO_OP[part]))
            continue
        for name, pattern in _PATTERNS:
            match = pattern.match(part)
            if match:
                number = match.group("value")
                value = int(number) if PRECISION[name] is None else float(number)
                ops.append(PromptOp(name, value))
                break
        else:
            if part.split(" ")[0] in _VERB_TO_OP or not _PHRASE.match(part):
                raise PromptParseError(f"not a restoration prompt op: {part!r} (in {text!r})")
            ops.append(PromptOp(part))
    return ops
