"""GPU record of a two-phase run: `lora_sft(pre_lora_data_path=...)` trains every parameter on raw text (phase 1),
then LoRA on chats on top of the phase-1 model (phase 2), in one call:

    python benchmarks/two_phase.py --out DIR --work /tmp/two-phase     # Qwen2.5-1.5B shape, random init
    python benchmarks/two_phase.py --tiny --out /tmp/two-phase-tiny    # CPU smoke run (hidden-64 model, < 2 min)

The model (a random-init model of a throughput.py shape with the tiny ChatML tokenizer) is built by
`throughput.build_model`; the data is written here: phase 1 `{"text": ...}` rows of words drawn from a small
vocabulary with a skewed frequency (a random model's loss falls fast on it), phase 2 chats whose answer is the
question's words in reverse order. The call passes the data, the step counts, `max_seq_len`,
`effective_batch_size` and `logging_steps=1`; everything else is lora_sft's default (backend, micro batch,
checkpointing, optimizer, attention: the plan's choice, as a user gets it).

Measured per phase, through one TrainerCallback passed in `callbacks` (lora_sft adds it to both trainers):
* tokens/s over the steps after `--warmup` (non-padding tokens, `throughput.make_timer` / `throughput.measure`:
  the same timer as the throughput table);
* peak GPU memory, allocated and reserved, from that phase's train begin (model loaded) to its end: at each
  train begin the callback frees the cache (gc + `torch.cuda.empty_cache()`) and resets the peak counters, so
  phase 2's peak does not include phase 1's;
* the losses of every step (phase 1's must fall).
Also recorded: phase 1's memory estimate from its completion record (pre_lora/model/training_hub_pre_lora.json,
the figure lora_sft checks against free memory) beside the measured peak; the final adapter's
`base_model_name_or_path` (must be the phase-1 model) and that `training_hub.load` loads it and runs a forward.

Results: DIR/results.md, DIR/results.json, DIR/logs/{prepare,run}.log. The model, data and run folder go to --work
(default DIR/work): keep them out of a folder that is copied back (the phase-1 model is a full 3 GB model).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import throughput  # benchmarks/throughput.py: shapes, model building, the step timer, child processes

REPO = throughput.REPO
RUN_MARK = "@@TWO_PHASE_RUN "
PREPARE_MARK = "@@TWO_PHASE_PREPARE "

# Words for both phases: a few hundred distinct ones, drawn with Zipf-like weights.
WORDS = ("the of and to in is was for on that with as by at from his it an were are which this be or has had "
         "not have one their its new after who they two her she first but all been other time more during also "
         "when there into school city year over world river field light music stone water bridge market garden "
         "paper north south east west green red blue white black small large old young long short early late "
         "house road train ship plane island mountain forest valley village county state nation army church "
         "player team game season league club song album band film book story poem author painter teacher "
         "doctor farmer king queen prince castle tower wall gate harbor coast lake sea wind rain snow winter "
         "summer spring autumn morning evening night day week month number letter word line page chapter").split()


# --------------------------------------------------------------------------------------------------------
# Preparation (own subprocess): model and data
# --------------------------------------------------------------------------------------------------------

def word_stream(rng: random.Random):
    weights = [1 / (rank + 1) for rank in range(len(WORDS))]
    while True:
        yield from rng.choices(WORDS, weights=weights, k=256)


def write_text_rows(path: Path, tokenizer, need_tokens: int, seq: int, rng: random.Random) -> dict:
    """Phase 1: `{"text": ...}` documents of ~seq/4 to ~seq/2 tokens until `need_tokens` tokens."""
    words, rows, tokens = word_stream(rng), [], 0
    while tokens < need_tokens:
        n_words = rng.randint(max(4, seq // 8), max(8, seq // 4))
        text = " ".join(next(words) for _ in range(n_words)).capitalize() + "."
        tokens += len(tokenizer(text)["input_ids"])
        rows.append({"text": text})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"rows": len(rows), "tokens": tokens}


def write_chat_rows(path: Path, tokenizer, need_tokens: int, seq: int, rng: random.Random) -> dict:
    """Phase 2: chats "Reverse these words: ..." -> the words reversed, until `need_tokens` rendered tokens."""
    words, rows, tokens = word_stream(rng), [], 0
    while tokens < need_tokens:
        chosen = [next(words) for _ in range(rng.randint(max(2, seq // 32), max(4, seq // 12)))]
        messages = [{"role": "user", "content": "Reverse these words: " + " ".join(chosen)},
                    {"role": "assistant", "content": " ".join(reversed(chosen))}]
        tokens += len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        rows.append({"messages": messages})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"rows": len(rows), "tokens": tokens}


def prepare(bench: dict) -> dict:
    import torch
    from transformers import AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    build_s = throughput.build_model(Path(bench["model_path"]), bench["shape"], device)
    tokenizer = AutoTokenizer.from_pretrained(bench["model_path"])
    rng = random.Random(0)
    # enough for every step at the effective batch, packed to seq, x1.3 (also when the plan does not pack)
    text = write_text_rows(Path(bench["text_path"]), tokenizer,
                           int(bench["phase1_steps"] * bench["batch"] * bench["seq"] * 1.3), bench["seq"], rng)
    chats = write_chat_rows(Path(bench["chat_path"]), tokenizer,
                            int(bench["phase2_steps"] * bench["batch"] * bench["seq"] * 1.3), bench["seq"], rng)
    return {"device": device, "gpu_name": torch.cuda.get_device_name() if device == "cuda" else "CPU",
            "build_seconds": build_s, "text_data": text, "chat_data": chats}


# --------------------------------------------------------------------------------------------------------
# The two-phase run (own subprocess)
# --------------------------------------------------------------------------------------------------------

def phase_recorder(cuda: bool, warmup: int):
    """A TrainerCallback that keeps, for each trainer it is added to (phase 1, then phase 2), a step timer, the
    logged losses and the peak memory from train begin to train end. Import after Unsloth."""
    import gc

    import torch
    from transformers import TrainerCallback

    class PhaseRecorder(TrainerCallback):
        def __init__(self):
            self.phases: list[dict] = []

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if cuda:  # the previous phase's model and cache go first, so this phase's peak is its own
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            timer = throughput.make_timer(cuda)
            self.phases.append({"timer": timer, "losses": [], "resident_gib": torch.cuda.memory_allocated() / 2**30
                                if cuda else None})
            timer.on_train_begin(args, state, control, model=model, **kwargs)

        def on_step_end(self, args, state, control, **kwargs):
            self.phases[-1]["timer"].on_step_end(args, state, control, **kwargs)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and isinstance(logs.get("loss"), (int, float)):
                self.phases[-1]["losses"].append(float(logs["loss"]))

        def on_train_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
                self.phases[-1]["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
                self.phases[-1]["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30

        def report(self) -> list[dict]:
            out = []
            for phase in self.phases:
                row = {k: v for k, v in phase.items() if k != "timer"}
                row.update(throughput.measure(phase["timer"], warmup))
                out.append(row)
            return out

    return PhaseRecorder()


def adapter_check(run_dir: Path, cuda: bool) -> dict:
    """The final adapter's base is the phase-1 model, and training_hub.load loads it and runs a forward."""
    import torch

    import training_hub
    from training_hub.pre_lora import model_folder

    base = json.loads((run_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    expected = str(model_folder(run_dir))
    report = {"adapter_base": base, "phase_one_model": expected, "base_is_phase_one": base == expected}
    try:
        model, tokenizer = training_hub.load(run_dir, device="cuda" if cuda else None)
        ids = tokenizer("Reverse these words: red blue", return_tensors="pt")["input_ids"].to(model.device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        report.update(loads=True, model_class=type(model).__name__, logits_finite=bool(torch.isfinite(logits).all()))
    except Exception as exc:  # recorded, not raised: the rest of the report still comes back
        report.update(loads=False, load_error=f"{type(exc).__name__}: {str(exc)[:300]}")
    return report


def phase_one_changes(base: Path, trained: Path) -> dict:
    """For the tensors of the first and last block, the embeddings and the final norm: the share of elements phase 1
    changed and the mean |change|. Phase 1 trains bf16 weights without fp32 master copies, so an update smaller
    than half a bf16 step of its weight (|w| / 256) is rounded away; this shows how much of the model moved."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict:
        found = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    found[key] = (path, key)
        return found

    before, after = tensors(base), tensors(trained)
    layers = sorted({int(k.split(".")[2]) for k in before if k.startswith("model.layers.")})
    wanted = [k for k in before if k in after and (k.startswith(("model.embed_tokens", "model.norm")) or
              any(k.startswith(f"model.layers.{i}.") for i in (layers[:1] + layers[-1:])))]
    out = {}
    for key in sorted(wanted):
        with safe_open(str(before[key][0]), "pt") as f0, safe_open(str(after[key][0]), "pt") as f1:
            a, b = f0.get_tensor(key).float(), f1.get_tensor(key).float()
        delta = (b - a).abs()
        out[key] = {"changed": round(float((delta > 0).float().mean()), 4), "mean_abs_change": float(delta.mean()),
                    "mean_abs_weight": float(a.abs().mean())}
    return out


def run(bench: dict) -> dict:
    run_dir = Path(bench["work"]) / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # overwrite_output_dir is refused with a phase 1
    backend = throughput.row_backend("a", {**bench, "data_path": bench["chat_path"]}, {})
    if backend == "unsloth":  # lora_sft would pick Unsloth (the CPU smoke run): import it before transformers
        from training_hub.models.unsloth import import_unsloth

        import_unsloth()
    import torch

    import training_hub

    cuda = torch.cuda.is_available()
    recorder = phase_recorder(cuda, bench["warmup"])
    report: dict = {"expected_backend_phase2": backend}
    start = time.perf_counter()
    try:
        result = training_hub.lora_sft(
            model_path=bench["model_path"], data_path=bench["chat_path"], ckpt_output_dir=str(run_dir),
            pre_lora_data_path=bench["text_path"], pre_lora_max_steps=bench["phase1_steps"],
            max_steps=bench["phase2_steps"], max_seq_len=bench["seq"], effective_batch_size=bench["batch"],
            logging_steps=1, callbacks=[recorder])
        keep = ("backend", "dtype", "micro_batch_size", "gradient_accumulation_steps", "sample_packing",
                "gradient_checkpointing", "optim", "attn_implementation", "packed_length", "liger_kernel", "notes")
        report.update(plan=result.plan and {k: result.plan.get(k) for k in keep},
                      phase2_metrics={k: result.metrics.get(k) for k in ("tokens_per_second", "train_loss",
                                                                         "peak_memory_gib", "global_step")})
    except Exception as exc:
        import traceback

        traceback.print_exc()
        report["error"] = f"{type(exc).__name__}: {str(exc).strip()[:400]}"
    report["seconds"] = time.perf_counter() - start
    report["phases"] = recorder.report()
    record_path = run_dir / "pre_lora" / "model" / "training_hub_pre_lora.json"
    if record_path.is_file():
        report["phase1_record"] = json.loads(record_path.read_text())
    if "error" not in report:
        report["adapter"] = adapter_check(run_dir, cuda)
    if (run_dir / "pre_lora" / "model").is_dir():
        report["phase1_changes"] = phase_one_changes(Path(bench["model_path"]), run_dir / "pre_lora" / "model")
    return report


# --------------------------------------------------------------------------------------------------------
# Results (parent: no torch)
# --------------------------------------------------------------------------------------------------------

def checks(report: dict) -> list[tuple[str, bool | None]]:
    phases = report.get("phases", [])
    out: list[tuple[str, bool | None]] = [("the run finished", "error" not in report),
                                          ("two phases recorded", len(phases) == 2)]
    for i, phase in enumerate(phases[:2], 1):
        losses = phase.get("losses") or []
        k = max(1, min(3, len(losses) // 3))
        falls = sum(losses[-k:]) / k < sum(losses[:k]) / k if len(losses) >= 2 else None
        out.append((f"phase {i} loss falls (mean of last {k} < mean of first {k})", falls))
    adapter = report.get("adapter", {})
    out.append(("adapter's base_model_name_or_path is the phase-1 model", adapter.get("base_is_phase_one")))
    out.append(("training_hub.load loads it and a forward is finite",
                adapter.get("loads") and adapter.get("logits_finite") if adapter else None))
    return out


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(bench: dict, prep: dict | None, report: dict, vers: dict) -> str:
    lines = [f"# Two-phase run: {bench['shape']} (random init)", "", f"- date: {bench['date']}",
             f"- device: {prep['gpu_name'] if prep else '?'}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
             f"- call: lora_sft(pre_lora_data_path=text, pre_lora_max_steps={bench['phase1_steps']}, "
             f"max_steps={bench['phase2_steps']}, max_seq_len={bench['seq']}, effective_batch_size={bench['batch']}, "
             "logging_steps=1); everything else default"]
    if prep:
        lines.append(f"- data: phase 1 {prep['text_data']['rows']} text rows ({prep['text_data']['tokens']:,} tokens), "
                     f"phase 2 {prep['chat_data']['rows']} chats ({prep['chat_data']['tokens']:,} tokens)")
    if report.get("error"):
        lines.append(f"- ERROR: {report['error']}")
    record = report.get("phase1_record") or {}
    plan = report.get("plan") or {}
    lines += ["", f"tokens/s over the steps after the first {bench['warmup']} of each phase; peak memory from the "
              "phase's train begin (model loaded) to its end", "",
              "| phase | tokens/s | peak GiB alloc / reserved | resident at start GiB | loss first -> last | steps |",
              "|---|---:|---:|---:|---:|---:|"]
    for i, phase in enumerate(report.get("phases", []), 1):
        losses = phase.get("losses") or [None]
        lines.append(f"| {i} ({'full fine-tune' if i == 1 else 'LoRA'}) | {fmt(phase.get('tokens_per_s'), ',.0f')} | "
                     f"{fmt(phase.get('peak_alloc_gib'), '.2f')} / {fmt(phase.get('peak_reserved_gib'), '.2f')} | "
                     f"{fmt(phase.get('resident_gib'), '.2f')} | {fmt(losses[0], '.3f')} -> {fmt(losses[-1], '.3f')} | "
                     f"{len(phase.get('losses') or [])} |")
    lines += ["", f"- phase 1 memory estimate (pre_lora.memory_estimate_bytes): {fmt(record.get('memory_estimate_gib'), '.2f')} "
              f"GiB; measured peak allocated {fmt((report.get('phases') or [{}])[0].get('peak_alloc_gib'), '.2f')} GiB",
              f"- phase 1 as recorded by lora_sft: {fmt(record.get('tokens_per_second'), ',.0f')} tokens/s, "
              f"{record.get('steps')} steps, saved as {record.get('dtype')}",
              f"- phase 2 plan: {throughput.plan_text(plan)}"]
    changes = report.get("phase1_changes") or {}
    if changes:
        shares = sorted(c["changed"] for c in changes.values())
        lines.append(f"- elements phase 1 changed, over {len(changes)} tensors (first and last block, embeddings, final "
                     f"norm): {shares[0]:.1%} to {shares[-1]:.1%}, median {shares[len(shares) // 2]:.1%} (results.json: "
                     "per tensor)")
    lines += ["", "Checks:"]
    lines += [f"- {text}: {'PASS' if ok else 'FAIL' if ok is False else 'n/a'}" for text, ok in checks(report)]
    return "\n".join(lines) + "\n"


def main_parent(args) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    shape = "tiny" if args.tiny else args.shape
    bench = {"shape": shape, "tiny": args.tiny, "mode": "lora", "seq": args.seq or (128 if args.tiny else 2048),
             "batch": args.batch or (4 if args.tiny else 8),
             "phase1_steps": args.phase1_steps or (6 if args.tiny else 15),
             "phase2_steps": args.phase2_steps or (6 if args.tiny else 15),
             "warmup": args.warmup if args.warmup is not None else (2 if args.tiny else 3),
             "out": str(out), "work": str(work), "model_path": str(work / "model"), "text_path": str(work / "text.jsonl"),
             "chat_path": str(work / "chats.jsonl"), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    (out / "bench.json").write_text(json.dumps(bench, indent=2))
    from training_hub.manifest import package_versions  # light: no torch

    vers = {k: v for k, v in package_versions().items() if k != "training-hub-lora"}
    me = Path(__file__).resolve()
    start = time.perf_counter()
    prep, detail = throughput.run_child(["--run-prepare", "--out", str(out)], out / "logs" / "prepare.log",
                                        PREPARE_MARK, args.timeout or None, script=me)
    if prep is None:
        print(f"two_phase: preparation failed ({detail}); see {out / 'logs' / 'prepare.log'}", flush=True)
        (out / "results.md").write_text(f"# Two-phase run\n\npreparation failed: {detail}\n")
        return 1
    print(f"two_phase: {prep['gpu_name']}, model {shape} built in {prep['build_seconds']:.0f} s, data written "
          f"[{time.perf_counter() - start:.0f} s]", flush=True)
    remaining = args.timeout - (time.perf_counter() - start) if args.timeout else None
    report, detail = throughput.run_child(["--run", "--out", str(out)], out / "logs" / "run.log", RUN_MARK,
                                          max(30.0, remaining) if remaining else None, script=me)
    report = report or {"error": detail}
    text = render(bench, prep, report, vers)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"bench": bench, "prepare": prep, "versions": vers, "report": report},
                                                 indent=2, default=str))
    print(f"\n{text}\ntwo_phase: {out / 'results.md'} written [total {time.perf_counter() - start:.0f} s]", flush=True)
    return 0 if all(ok for _, ok in checks(report)) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=[s for s in throughput.SHAPES if s != "tiny"], default="qwen2.5-1.5b")
    parser.add_argument("--out", required=True, help="folder for results and logs")
    parser.add_argument("--work", help="folder for the model, data and run (default: OUT/work)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: hidden-64 model, seq 128, 6 + 6 steps")
    parser.add_argument("--seq", type=int, help="max_seq_len (default 2048; 128 with --tiny)")
    parser.add_argument("--batch", type=int, help="effective_batch_size (default 8; 4 with --tiny)")
    parser.add_argument("--phase1-steps", type=int, help="pre_lora_max_steps (default 15; 6 with --tiny)")
    parser.add_argument("--phase2-steps", type=int, help="max_steps of phase 2 (default 15; 6 with --tiny)")
    parser.add_argument("--warmup", type=int, help="steps of each phase left out of tokens/s (default 3; 2 with --tiny)")
    parser.add_argument("--timeout", type=float, default=0, help="seconds for preparation + run (0: none)")
    parser.add_argument("--run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run or args.run_prepare:
        bench = json.loads((Path(args.out) / "bench.json").read_text())
        if args.run_prepare:
            print(PREPARE_MARK + json.dumps(prepare(bench)), flush=True)
        else:
            print(RUN_MARK + json.dumps(run(bench), default=str), flush=True)
        return 0
    return main_parent(args)


if __name__ == "__main__":
    sys.exit(main())
