"""Task expansion (which prompts a video gets) and multiple-choice answer parsing."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class Task:
    """One prompt for one video. ``prompt`` is the exact user text given to the model."""

    task_id: str
    task_type: str  # caption | qa | mcq
    prompt: str
    max_new_tokens: int
    options: tuple[str, ...] = field(default=())

    @property
    def is_mcq(self) -> bool:
        return self.task_type == "mcq"


def mcq_prompt(question: str, options: Sequence[str], instruction: str) -> str:
    """The LLaVA-OneVision evaluation format: question, one ``A. option`` line per option, instruction."""
    lines = [question.strip()] + [f"{LETTERS[i]}. {opt.strip()}" for i, opt in enumerate(options)]
    if instruction:
        lines.append(instruction.strip())
    return "\n".join(lines)


def global_tasks(tasks_cfg) -> list[Task]:
    """The tasks every video gets (caption, standard questions, MCQs), in a stable order."""
    t = tasks_cfg
    out = [Task("caption", "caption", t.caption_prompt, t.max_new_tokens)] if t.caption_prompt else []
    out += [Task(f"qa:{i}", "qa", q, t.max_new_tokens) for i, q in enumerate(t.questions)]
    out += [Task(m.id or f"mcq:{i}", "mcq", mcq_prompt(m.question, m.options, t.mcq_instruction),
                 t.mcq_max_new_tokens, tuple(m.options)) for i, m in enumerate(t.mcq)]
    return out


def video_tasks(tasks_cfg, questions: Sequence[str] | None) -> list[Task]:
    """All tasks of one video: the global ones, then its manifest questions (``vq:<i>``)."""
    out = global_tasks(tasks_cfg)
    if tasks_cfg.use_manifest_questions and questions is not None:
        out += [Task(f"vq:{i}", "qa", str(q), tasks_cfg.max_new_tokens)
                for i, q in enumerate(questions) if q is not None and str(q).strip()]
    return out


NO_TASK = Task("none", "qa", "", 0)

_PATTERNS = [
    # "B", "B.", "(B)", "B)" at the start ("A person ..." is not a letter answer)
    re.compile(r"^\s*[\(\[]?([A-Z])(?:[\)\]\.:,]|\s*$)"),
    re.compile(r"(?i:answer(?:\s+is)?|option|choice)\s*[:\-]?\s*[\(\[]?([A-Z])\b"),
    re.compile(r"[\(\[]([A-Z])[\)\]]"),
]


def parse_choice(text: str | None, options: Sequence[str]) -> str | None:
    """The option letter an MCQ answer names, or None when it names none (or an out-of-range letter).

    Accepts "B", "B.", "(B)", "B) text", "The answer is B", "Answer: (C)", or the exact text of one
    option (case-insensitive) when no letter is found.
    """
    if not text:
        return None
    valid = set(LETTERS[: len(options)])
    stripped = text.strip()
    for pattern in _PATTERNS:
        m = pattern.search(stripped)
        if m and m.group(1) in valid:
            return m.group(1)
    lowered = stripped.lower().rstrip(".")
    matches = [i for i, opt in enumerate(options) if opt.strip() and opt.strip().lower() in lowered]
    return LETTERS[matches[0]] if len(matches) == 1 else None


def row_tasks(tasks_cfg, questions: Sequence[str] | None) -> list[Task]:
    """The tasks whose rows one video gets, for the driver and the stages alike: :func:`video_tasks`, or the single
    :data:`NO_TASK` (an error row) when no task applies."""
    return video_tasks(tasks_cfg, questions) or [NO_TASK]


def expected_task_ids(tasks_cfg, videos) -> list[list[str]]:
    """The ``task_id`` of every output row each video of ``videos`` (a table with a ``questions`` column) gets."""
    return [[t.task_id for t in row_tasks(tasks_cfg, q)] for q in videos.column("questions").to_pylist()]
