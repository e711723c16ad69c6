"""The Gemma chat format (the same for Gemma 1, 2 and 3).

    <bos><start_of_turn>user\n{msg}<end_of_turn>\n<start_of_turn>model\n

A system prompt has no role of its own in Gemma: it is folded into the first user turn,
followed by a blank line, as Gemma's own template does.
"""

from __future__ import annotations

GEMMA_TEMPLATE = "<start_of_turn>{role}\n{content}<end_of_turn>\n"
MODEL_PREFIX = "<start_of_turn>model\n"


def format_turn(role: str, content: str) -> str:
    return GEMMA_TEMPLATE.format(role=role, content=content)


def render(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render [{role, content}] (roles: system, user, assistant/model) without the <bos>."""
    out, system = [], None
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system":
            system = content if system is None else system + "\n\n" + content
            continue
        if role == "user" and system is not None:
            content, system = f"{system}\n\n{content}", None
        out.append(format_turn("model" if role in ("assistant", "model") else "user", content))
    if add_generation_prompt:
        out.append(MODEL_PREFIX)
    return "".join(out)
