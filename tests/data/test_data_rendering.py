"""Batched rendering: one template call for many jobs gives exactly what apply_chat_template gives, job by job."""

from __future__ import annotations

import pytest

from tool_templates import HERMES_TEMPLATE, LLAMA31_TEMPLATE, QWEN3_TEMPLATE, TOOL_CHAT
from training_hub.data import load_examples
from training_hub.data.masking import render_jobs
from training_hub.data.rendering import BatchRenderer
from training_hub.tiny import CHAT_TEMPLATES, build_tokenizer

# What a template `set`s in one job must not leak into the next (Jinja scopes loop bodies per iteration).
CONDITIONAL_SET = (
    "{% if messages[0].role == 'system' %}{% set system = messages[0].content %}{% endif %}\n"
    "  {% if not day is defined %}{% set day = messages | length %}{% endif %}"
    "[{{ system | default('no system') }} {{ day }}]{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}\n"
)


def jobs_of(rows):
    jobs = []
    for example in load_examples(rows).examples:
        jobs += render_jobs(example.messages, example.tools, spans=True)
    return jobs


@pytest.mark.parametrize("template", [HERMES_TEMPLATE, LLAMA31_TEMPLATE, QWEN3_TEMPLATE, CONDITIONAL_SET,
                                      *CHAT_TEMPLATES.values()])
def test_batched_renders_equal_one_by_one_renders(template):
    tokenizer = build_tokenizer("llama3")
    tokenizer.chat_template = template
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    rows = [TOOL_CHAT, plain, TOOL_CHAT] if "tool" in template else [TOOL_CHAT | {"tools": None}, plain]
    if template == QWEN3_TEMPLATE:
        rows = [plain, {"messages": [{"role": "system", "content": "Be brief."}, *plain["messages"]]}]
    jobs = jobs_of(rows)
    batch = BatchRenderer(tokenizer, None)
    assert batch.render(jobs) == [batch.render_one(job) for job in jobs]
    assert batch.wrapper_works == {template: True}  # the wrapped template was used, not the fallback


def test_a_template_the_wrapper_cannot_reproduce_is_rendered_job_by_job():
    tokenizer = build_tokenizer("chatml")
    tokenizer.chat_template = "{{ training_hub_job | default('alone') }}{{ messages | length }}"  # sees the wrapper
    jobs = jobs_of([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}])
    batch = BatchRenderer(tokenizer, None)
    assert batch.render(jobs) == ["alone1", "alone2"] and batch.wrapper_works == {tokenizer.chat_template: False}
