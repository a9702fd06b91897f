"""The console: formatted step lines, summaries, the interval rate, and the scoped silencing of third-party output."""

import logging
import warnings

from training_hub import console


def test_step_line_formats_each_figure_once():
    line = console.step_line(120, 600, {"loss": 1.23456, "learning_rate": 0.0019, "grad_norm": 0.8312,
                                        "num_tokens": 5.0, "train_tokens_per_second": 99.0}, 4497.4, 151)
    assert line == "step 120/600 | loss 1.2346 | lr 1.90e-03 | grad 0.831 | 4,497 tok/s | ETA 2:31"
    assert console.step_line(7, 10, {"loss": float("nan")}, None, None) == "step  7/10 | loss nan"


def test_eval_line_and_durations():
    line = console.eval_line(30, 60, {"eval_loss": 0.51234, "eval_runtime": 1.2, "eval_samples_per_second": 8.0})
    assert line == "eval at step 30/60: loss 0.5123"
    assert [console.format_duration(s) for s in (3, 63, 3723, float("inf"))] == ["3s", "1:03", "1:02:03", "?"]


def test_planned_steps_counts_a_partial_last_batch_as_a_step():
    assert console.planned_steps(rows=38, effective_batch_size=8, num_epochs=3, max_steps=None) == (15, 3.0)
    assert console.planned_steps(rows=38, effective_batch_size=8, num_epochs=3, max_steps=6) == (6, 1.2)


def test_rate_is_over_the_last_interval_not_the_running_average(monkeypatch):
    clock = iter([0.0, 0.0, 10.0, 11.0])  # construction, begin, two updates
    monkeypatch.setattr(console.time, "perf_counter", lambda: next(clock))
    rate = console._Rate()
    rate.begin(step=0, tokens=0)
    assert rate.update(step=10, total=20, tokens=1000) == (100.0, 10.0)  # 1000 tokens in 10 s; 10 s per 10 steps
    fast, eta = rate.update(step=20, total=20, tokens=11000)
    assert fast == 10000.0 and eta == 0.0  # 10,000 tokens in the last second (the running average is ~1,000)


def facts(**kw):
    base = dict(model="m", architecture="Qwen2ForCausalLM", backend="peft", device="CPU", dtype="float32",
                quantization=None, trainable=32768, total=163904,
                lora=dict(r=16, alpha=32, dropout=0.0, targets=["q_proj", "v_proj"], rslora=False, dora=True),
                data=dict(rows_out=38, format="messages", tokens_total=1376, supervised_tokens_total=688),
                packing=False, max_seq_len=2048, micro=4, accumulation=2, world=1, effective=8, steps=6, epochs=1.2,
                output="out")
    return {**base, **kw}


def test_start_summary_names_every_fact_in_a_few_lines():
    text = console.start_summary(facts())
    assert len(text.splitlines()) == 8
    for expected in ("m (Qwen2ForCausalLM), backend peft, float32 on CPU", "not quantized", "r 16, alpha 32",
                     "DoRA", "q_proj, v_proj", "32,768 of 163,904", "(19.99%)", "38 rows (messages), 1,376 tokens, 50.0%",
                     "8 = micro 4 x accumulation 2 x 1", "6 (1.20 epochs)", "output   out"):
        assert expected in text, expected


def test_end_summary_shows_gpu_figures_only_when_measured():
    cpu = console.end_summary({"train_runtime": 75.0, "global_step": 6, "tokens_per_second": 1234.5, "train_loss": 1.5},
                              {"train_loss": 1.2, "eval_loss": 1.3}, "out")
    assert "1:15 for 6 steps; 1,234 tokens/s" in cpu and "MFU" not in cpu
    assert "train loss 1.5000 (mean over the run), last train loss 1.2000, last eval loss 1.3000" in cpu
    assert "training_hub.load('out')" in cpu
    gpu = console.end_summary({"tokens_per_second": 1.0, "mfu": 0.55, "peak_memory_gib": 74.04}, {}, "out", 989.0)
    assert "MFU 55.0% of 989 TFLOP/s, peak memory 74.0 GiB" in gpu


def test_quiet_third_party_is_scoped():
    import datasets

    quiet = logging.getLogger("torchao")
    quiet.setLevel(logging.INFO)
    assert datasets.is_progress_bar_enabled()
    with console.quiet_third_party():
        assert logging.getLogger("torchao.kernel.intmm").getEffectiveLevel() == logging.ERROR
        assert not datasets.is_progress_bar_enabled()
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("`torch.jit.script_method` is deprecated. Please switch", DeprecationWarning)
            warnings.warn("something else", UserWarning)
    assert [str(w.message) for w in caught] == ["something else"]
    assert quiet.level == logging.INFO and datasets.is_progress_bar_enabled()
    quiet.setLevel(logging.NOTSET)


def test_dry_run_counts_steps_epochs_tokens_on_a_folder_holding_a_run(tiny_model_factory, greeting_jsonl, tmp_path,
                                                                       capsys, caplog):
    from training_hub import lora_sft

    out = tmp_path / "out"
    out.mkdir()
    (out / "run_config.json").write_text("{}")  # an earlier run's files: a dry run reads past them, writes nothing
    (out / "checkpoint-5").mkdir()
    before = sorted(p.name for p in out.rglob("*"))
    with caplog.at_level(logging.INFO, logger="training_hub"):
        result = lora_sft(str(tiny_model_factory("qwen2", "chatml")), str(greeting_jsonl), str(out), backend="peft",
                          dry_run=True, effective_batch_size=8, num_epochs=3, data_output_dir="none")
    tokens = result.data_summary["tokens_total"]
    said = capsys.readouterr().err + caplog.text
    assert (f"dry run: 18 optimizer steps = 3.00 epochs of 6 steps (48 rows, 8 per step); {tokens:,} tokens per epoch, "
            f"{3 * tokens:,} in all") in said
    assert sorted(p.name for p in out.rglob("*")) == before and (out / "run_config.json").read_text() == "{}"
