"""Many chat-template renders in one template call.

Masking renders each conversation several times (whole, and up to each answer). Called one by one, most
of the time of a small render goes to setting up Jinja's context. Here the chat template is wrapped in a
loop over render jobs (messages, tools, add_generation_prompt) and rendered once for a whole chunk of rows,
with a unique separator between the outputs. Jinja scopes what a template ``set``s inside a loop to one
iteration, so each job renders as it would alone; the first job of each template is checked against
``apply_chat_template``, and a template the wrapper does not reproduce (or cannot compile) is rendered job
by job through ``apply_chat_template``.
"""

from __future__ import annotations

import uuid
from typing import Any

from .schema import Message

RenderJob = tuple[list[Message], "list[dict] | None", bool]  # messages, tools, add_generation_prompt
JOBS = "training_hub_render_jobs"
SEPARATOR = "training_hub_separator"


def wrap_template(template: str) -> str:
    """The template inside a loop over ``JOBS``; the newline after the last tag is eaten by ``trim_blocks``, so
    the template's first line starts a line as it does alone (``lstrip_blocks`` sees the same text)."""
    return ("{% for training_hub_job in " + JOBS + " %}{% set messages = training_hub_job[0] %}"
            "{% set tools = training_hub_job[1] %}{% set add_generation_prompt = training_hub_job[2] %}\n"
            + template + "{{ " + SEPARATOR + " }}{% endfor %}")


class BatchRenderer:
    """Renders jobs with one tokenizer's chat template(s), in one call per template where that reproduces
    ``apply_chat_template`` exactly. Jinja's TemplateError (a template's ``raise_exception``) propagates."""

    def __init__(self, tokenizer: Any, chat_template: str | None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template  # None: the tokenizer's own
        self.wrapper_works: dict[str, bool] = {}

    def render(self, jobs: list[RenderJob]) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, (_, tools, _) in enumerate(jobs):
            groups.setdefault(self.tokenizer.get_chat_template(self.chat_template, tools), []).append(i)
        out: list[str] = [""] * len(jobs)
        for template, indices in groups.items():
            group = [jobs[i] for i in indices]
            texts = self.render_wrapped(template, group) if self.wrapper_ok(template, group[0]) else None
            for i, text in zip(indices, texts if texts is not None else [self.render_one(job) for job in group]):
                out[i] = text
        return out

    def render_one(self, job: RenderJob) -> str:
        messages, tools, add_generation_prompt = job
        extra = {"chat_template": self.chat_template} if self.chat_template else {}
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **extra)

    def wrapper_ok(self, template: str, job: RenderJob) -> bool:
        """Whether the wrapped template renders ``job`` exactly as ``apply_chat_template`` does (decided once)."""
        if template not in self.wrapper_works:
            from jinja2 import TemplateSyntaxError

            try:
                self.wrapper_works[template] = self.render_wrapped(template, [job]) == [self.render_one(job)]
            except TemplateSyntaxError:
                self.wrapper_works[template] = False
        return self.wrapper_works[template]

    def render_wrapped(self, template: str, jobs: list[RenderJob]) -> list[str] | None:
        """The jobs' texts from one render of the wrapped template; None if the separator count is off."""
        from transformers.utils.chat_template_utils import render_jinja_template

        separator = f"\x00{uuid.uuid4().hex}\x00"
        context = {**self.tokenizer.special_tokens_map, JOBS: jobs, SEPARATOR: separator}
        rendered, _ = render_jinja_template([[]], chat_template=wrap_template(template), **context)
        parts = rendered[0].split(separator)
        return parts[:-1] if len(parts) == len(jobs) + 1 and not parts[-1] else None
