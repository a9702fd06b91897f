"""Every data format trains end to end from a .jsonl file with no dataset_type given; bad data writes nothing."""

import pytest

from sample_data import write_jsonl
from jobs import losses, metric_rows, train

from training_hub import lora_sft
from training_hub.data import DataError

pytestmark = pytest.mark.slow


def rows_for(fmt: str) -> list[dict]:
    names = ["Alice", "Bob", "Carol", "Dave"]
    out = []
    for i in range(16):
        n = names[i % 4]
        question, answer = f"Greet {n}.", f"Hello, {n}! Nice to meet you."
        out.append({
            "messages": {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": question},
                                      {"role": "assistant", "content": answer}]},
            "alpaca": {"instruction": question, "input": "" if i % 2 else "Politely.", "output": answer},
            "sharegpt": {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]},
            "prompt_completion": {"prompt": question, "completion": answer},
            "text": {"text": f"{question} {answer}"},
            "passthrough": {"input_ids": [10 + (i + j) % 50 for j in range(20)], "labels": [-100] * 8 + [10 + (i + j) % 50 for j in range(8, 20)]},
        }[fmt])
    return out


@pytest.mark.parametrize("fmt", ["messages", "alpaca", "sharegpt", "prompt_completion", "text", "passthrough"])
def test_each_format_trains_from_jsonl_without_dataset_type(fmt, tiny_model_factory, tmp_path):
    base = tiny_model_factory("qwen2", "chatml")
    data = write_jsonl(tmp_path / f"{fmt}.jsonl", rows_for(fmt))
    extra = {}
    if fmt == "messages":  # evaluation goes through the same pipeline
        extra = dict(eval_data_path=str(write_jsonl(tmp_path / "eval.jsonl", rows_for(fmt)[:4])), eval_steps=2)
    if fmt == "alpaca":  # or is carved from the training rows
        extra = dict(eval_split=0.25, eval_steps=2)
    summary = train(model_path=str(base), data_path=str(data), ckpt_output_dir=str(tmp_path / "out"), backend="peft",
                    max_steps=4, logging_steps=1, learning_rate=3e-3, save_steps=1000, warmup_steps=0,
                    data_output_dir="none", **extra)
    assert summary["data_summary"]["format"] == fmt
    assert summary["data_summary"]["rows_out"] == (12 if fmt == "alpaca" else 16)
    assert len(losses(tmp_path / "out")) == 4
    if fmt in ("messages", "alpaca"):
        rows = metric_rows(tmp_path / "out")
        assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]


@pytest.mark.parametrize(
    "content, fragment",
    [
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "bad.jsonl:1"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{not json\n', "bad.jsonl:2"),
        ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n', "robot"),
        ("", "empty"),
    ],
)
def test_bad_data_fails_before_anything_is_written(content, fragment, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=fragment):
        lora_sft("no-such-model", str(bad), str(out), backend="peft")
    assert not out.exists()
