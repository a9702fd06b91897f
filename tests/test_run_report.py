"""What a run leaves for people: loss.png (training_hub.plot_loss) and the README.md model card; and the whole run's
train_loss after a resume, the same in the metrics file and in run_config.json."""

import json
from pathlib import Path

import pytest

from jobs import metric_rows, run_job
from training_hub import plot_loss
from training_hub.card import model_card

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "training_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_loss_draws_train_eval_and_learning_rate_without_touching_pyplot(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    rows = [{"step": s, "loss": 3.0 / s, "learning_rate": 1e-4 * s, "grad_norm": 1.0} for s in range(1, 11)]
    rows += [{"step": 5, "eval_loss": 0.9}, {"step": 10, "eval_loss": 0.5},
             {"step": 10, "train_loss": 1.0, "train_runtime": 3.0}]
    write_metrics(tmp_path, rows)
    path = plot_loss(tmp_path)
    assert path == tmp_path / "loss.png" and path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > 10_000  # curves, axes and legend, not an empty canvas
    assert matplotlib.get_backend() == backend  # no process-wide backend switch
    assert not list(tmp_path.glob("*.tmp*"))


def test_plot_loss_draws_each_phase_and_refuses_a_folder_without_metrics(tmp_path):
    rows = [{"step": s, "loss": 2.0 / s, "phase": "sft"} for s in range(1, 6)]
    rows += [{"step": s, "loss": 1.0 / s, "phase": "dpo"} for s in range(6, 11)]
    write_metrics(tmp_path / "run", rows)
    assert plot_loss(tmp_path / "run", tmp_path / "two-phases.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(FileNotFoundError, match="training_metrics.jsonl does not exist"):
        plot_loss(tmp_path / "empty")


def manifest() -> dict:
    config = dict(model_path="Qwen/Qwen2.5-0.5B", data_path="train.jsonl", lora_r=8, lora_alpha=16, lora_dropout=0.05,
                  use_rslora=False, use_dora=False, load_in_4bit=True, load_in_8bit=False, bnb_4bit_quant_type="nf4",
                  bnb_4bit_use_double_quant=True, train_on_inputs=False, eval_data_path=None, eval_split=0.1,
                  max_steps=None, num_epochs=2, learning_rate=2e-4, lr_scheduler="cosine", warmup_steps=10,
                  max_seq_len=1024, weight_decay=0.01, max_grad_norm=0.3, seed=7)
    plan = dict(effective_batch_size=16, micro_batch_size=8, gradient_accumulation_steps=2, world_size=1,
                sample_packing=True, optim="adamw_8bit", dtype="bfloat16", device="cuda", backend="unsloth")
    data = dict(rows_in=1000, rows_out=990, format="alpaca", template_note="tokenizer chat template", tokens_total=200_000,
                supervised_tokens_total=80_000, fingerprint="abcdef0123456789", chat_template_sha256="f" * 64)
    model = dict(target_modules=["q_proj", "v_proj"], trainable_parameters=1_081_344, total_parameters=494_032_768)
    metrics = dict(train_loss=1.2345, global_step=124, num_tokens=400_000, train_runtime=61.0, tokens_per_second=6557.0)
    return dict(config=config, plan=plan, data=data, model=model, metrics=metrics, versions={"training-hub": "0.1.0"})


def test_model_card_says_what_was_trained_and_how_to_load_it(tmp_path):
    write_metrics(tmp_path, [{"step": 120, "loss": 1.01}, {"step": 124, "eval_loss": 1.11}])
    card = model_card(manifest(), tmp_path)
    assert card.startswith('---\nbase_model: "Qwen/Qwen2.5-0.5B"\nlibrary_name: peft\ntags: ["lora", "sft", "training_hub", "qlora"]')
    for expected in ("LoRA r 8, alpha 16, dropout 0.05 on `q_proj`, `v_proj`", "1,081,344 of 494,032,768 (0.22%)",
                     "4-bit nf4, double quantization", "990 of 1,000 rows kept (format alpaca", "40.0% with loss",
                     "`abcdef0123456789`", "10% of the training rows", "2 epochs", "0.0002, cosine",
                     "16 sequences per step = micro 8 x accumulation 2 x 1", "1,024 tokens, packing on", "adamw_8bit",
                     "| train loss (mean over the run) | 1.2345 |", "| last logged train loss | 1.0100 |",
                     "| last logged eval loss | 1.1100 |", "124 (400,000 tokens)", f'training_hub.load("{tmp_path}")',
                     "![loss curve](loss.png)"):
        assert expected in card, expected
    assert "More Information Needed" not in card


@pytest.mark.slow
def test_resumed_run_reports_one_train_loss_everywhere(tiny_model_factory, greeting_jsonl, tmp_path):
    """Killed after checkpoint-2, resumed to step 4: the metrics file's summary line, run_config.json and the step
    losses agree on the whole run's mean; loss.png and the card are written by the resumed run."""
    out = tmp_path / "out"
    job = dict(model_path=str(tiny_model_factory("qwen2", "chatml")), data_path=str(greeting_jsonl),
               ckpt_output_dir=str(out), backend="peft", max_steps=4, effective_batch_size=8, save_steps=2,
               learning_rate=1e-3, data_output_dir="none")
    first = run_job(expect_ok=False, **job, _kill_after_save_step=2)
    assert first.returncode != 0 and (out / "checkpoint-2").is_dir()
    run_job(**job, resume_from_checkpoint=True)
    rows = metric_rows(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    whole_run = sum(losses) / 4
    summary = rows[-1]["train_loss"]
    manifest_loss = json.loads((out / "run_config.json").read_text())["metrics"]["train_loss"]
    assert summary == pytest.approx(whole_run, rel=1e-6) and manifest_loss == pytest.approx(whole_run, rel=1e-6)
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    assert f"| train loss (mean over the run) | {whole_run:.4f} |" in (out / "README.md").read_text()


@pytest.mark.slow
def test_a_run_leaves_a_plot_a_card_and_a_readable_console(surface_run):
    out, stderr = surface_run["out"], surface_run["stderr"]
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    card = (out / "README.md").read_text()
    assert "More Information Needed" not in card and "| data fingerprint |" in card and "20% of the training rows" in card
    steps = [line for line in stderr.splitlines() if line.startswith("training_hub: step ")]
    assert [line.split(" | ")[0] for line in steps] == [f"training_hub: step {s}/5" for s in range(1, 6)]
    assert all(" | loss " in line and " | lr " in line and " | grad " in line and " tok/s | ETA " in line for line in steps)
    assert "eval at step 2/5: loss " in stderr and "training:\n  model" in stderr and "done:\n  time" in stderr
    for noise in ("{'loss'", "Saving the dataset", "Truncating train dataset", "Dropping fully masked"):
        assert noise not in stderr, noise
