"""What the MLLM is asked: yes/no and reason templates, the chat-template fallback, the answer tokens."""

from __future__ import annotations

from typing import Any

MAX_CONTEXT_CHARS = 600  # tile context given to the MLLM: enough for a list of OSM features

MATCH_QUESTION = (
    "Does this tile match the description?\nDescription: {description}\n{context}Answer yes or no."
)
REASON_REQUEST = (
    "This is an overhead map or satellite tile.\nDescription of a place, written from the street: "
    "{description}\n{context}In one to three sentences, say what in the tile matches the description "
    "and what does not."
)
EVIDENCE_REQUEST = (
    "This is an overhead map tile.\nDescription of a place: {description}\nChecked against the map data of "
    "this tile: {evidence}\nIn one short sentence, say what the tile shows that matches the description. "
    "Name only places listed above."
)
# What follows the prompt when the tokenizer has no chat template: the model then continues the text.
PLAIN_LEADS = {"question": "Answer:", "reason": "Explanation:"}


def context_text(context: dict[str, Any] | None, max_chars: int = MAX_CONTEXT_CHARS) -> str:
    """A tile's context columns as prompt lines ("Map features: ...\\n"); empty without any."""
    parts = []
    for key, value in (context or {}).items():
        if value is None or value == "" or value == []:
            continue
        shown = ", ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
        parts.append(f"{str(key).replace('_', ' ')}: {shown}")
    if not parts:
        return ""
    text = "; ".join(parts)
    text = text if len(text) <= max_chars else text[: max_chars - 3].rsplit(" ", 1)[0] + "..."
    return f"Known from the map of this tile: {text}\n"


def match_question(description: str, context: dict[str, Any] | None) -> str:
    """The yes/no question about one tile (P(yes) is read from its answer)."""
    return MATCH_QUESTION.format(description=description.strip(), context=context_text(context))


def reason_request(description: str, context: dict[str, Any] | None) -> str:
    """The request for 1-3 sentences on what in one tile matches the description."""
    return REASON_REQUEST.format(description=description.strip(), context=context_text(context))


def evidence_text(found: list[str], nearby: list[str], missing: list[str], shows: list[str]) -> str:
    """The evidence as one prompt line: "in the tile: A, B; nearby: C; not found: D"."""
    parts = [
        f"{label}: {', '.join(items)}"
        for label, items in (
            ("in the tile", found),
            ("nearby", nearby),
            ("not found", missing),
            ("the tile has", shows),
        )
        if items
    ]
    return "; ".join(parts) or "nothing checkable"


def evidence_request(description: str, evidence: str) -> str:
    """The request for one sentence on a tile, written from its evidence (see retriever.explain.evidence)."""
    return EVIDENCE_REQUEST.format(description=description.strip(), evidence=evidence)


def build_prompt(tokenizer: Any, placeholder: str, body: str, lead: str) -> str:
    """The user turn with the image first, through the chat template when it keeps the image placeholder.

    Templates differ: some take a list of typed parts (Qwen2-VL, SmolVLM), some plain strings (SmolLM2).
    Without a usable template the prompt is plain text ending in `lead`, which the model continues.
    """
    if getattr(tokenizer, "chat_template", None):
        parts = [{"type": "image"}, {"type": "text", "text": body}]
        for content in (parts, f"{placeholder}\n{body}"):
            try:
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
                )
            except Exception:  # a template that cannot render this content shape: try the next one
                continue
            if isinstance(text, str) and text.count(placeholder) == 1:
                return text
    return f"{placeholder}\n{body}\n{lead}"


def answer_token_ids(tokenizer: Any, word: str) -> list[int]:
    """Token ids that start the answer `word`: its single-token spellings ("yes", " yes", "Yes", " Yes")."""
    variants = dict.fromkeys([word, " " + word, word.capitalize(), " " + word.capitalize()])
    singles = {ids[0] for v in variants if len(ids := tokenizer.encode(v, add_special_tokens=False)) == 1}
    if not singles:  # no single-token spelling: the first piece of the plain word
        first = tokenizer.encode(word, add_special_tokens=False)
        singles = {first[0]} if first else set()
    return sorted(singles)


def yes_no_token_ids(tokenizer: Any, yes: str = "yes", no: str = "no") -> tuple[list[int], list[int]]:
    """The ids of each answer word, less those the two words share (which could not tell them apart)."""
    yes_ids, no_ids = answer_token_ids(tokenizer, yes), answer_token_ids(tokenizer, no)
    return [i for i in yes_ids if i not in no_ids], [i for i in no_ids if i not in yes_ids]
