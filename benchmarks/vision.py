"""GPU record of vision-language LoRA: the reference-style call
`lora_sft(model_path=VL model, data_path=image chats, finetune_vision_layers=True, ...)` on a random-init model,
in bf16 and with `load_in_4bit=True`, each row in its own subprocess with a timeout:

    python benchmarks/vision.py --out DIR --work /tmp/vision          # qwen2-vl rows, then llava rows (GPU)
    python benchmarks/vision.py --tiny --family llava --out DIR        # CPU smoke run, end to end
    python benchmarks/vision.py --tiny --family qwen2-vl --out DIR     # CPU: the Qwen2-VL checks that run here

Families (random init, built offline with a tokenizer trained on the spot, saved with the model):
* qwen2-vl: Qwen2-VL-2B's shape (Qwen2 1.5B text model with M-RoPE, 32-block ViT "visual", 2x2 patch merger);
  processor = Qwen2VLImageProcessor + Qwen2VLVideoProcessor + a tokenizer with Qwen2-VL's special tokens and
  chat template. Images of 448x448 become 256 image tokens.
* llava: Qwen2.5-1.5B's shape as the text model + CLIP ViT-L/14 at 336 px (576 image tokens), LlavaProcessor
  with CLIP's Pillow image processor (no torchvision): the fallback record, the family the CPU tests train.

The data: generated PNGs (a coloured shape on a plain background) in `{"type": "image", "image": PATH}` parts,
"What is in this picture?" -> "A red circle on a white background.". Rows: FAMILY-bf16 (LoRA on both towers)
and FAMILY-4bit (the same with load_in_4bit=True). Each row records tokens/s (steps after --warmup, non-padding
tokens including image tokens, `throughput.make_timer`), peak GPU memory of its process, the loss curve (must
fall), the plan, and checks: the adapter covers the vision tower and the language model, the processor is saved
with it, and `training_hub.load` returns the model and processor and runs a forward on an image chat.

On a machine without torchvision the Qwen2-VL processor cannot be saved and loaded (transformers' Qwen2-VL video
processor is built on torchvision), so lora_sft cannot run on it; there `--family qwen2-vl` runs the checks that
can: the tiny Qwen2-VL model, a processor with the Pillow image processor and a stand-in video processor, our
tokenization and masking, the collator's batch (pixel_values, image_grid_thw, mm_token_type_ids), the LoRA
targets of `finetune_vision_layers=True` and a few training steps through PEFT.

Results: DIR/results.md and DIR/results.json (rewritten after each row), DIR/logs/*.log; models, data and runs
in --work (default DIR/work).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import throughput  # benchmarks/throughput.py: the step timer, child processes

ROW_MARK = "@@VISION_ROW "
PREPARE_MARK = "@@VISION_PREPARE "
FAMILIES = ("qwen2-vl", "llava")
COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
          "purple": (140, 50, 170), "orange": (245, 140, 20)}
SHAPES_DRAWN = ("circle", "square", "triangle", "cross")
BACKGROUNDS = {"white": (250, 250, 250), "black": (10, 10, 10), "grey": (128, 128, 128)}
QUESTION = "What is in this picture?"

# Qwen2-VL's tokens (the order of its tokenizer's added tokens) and chat template (Qwen2-VL-2B-Instruct's).
QWEN2_VL_SPECIAL_TOKENS = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                           "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                           "<|image_pad|>", "<|video_pad|>"]
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")

# Text model shapes (Qwen2-VL-2B's language model = Qwen2.5-1.5B's; tiny: hidden 64); vision shapes per family.
TEXT_SHAPES = {
    "full": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6, max_position_embeddings=32768),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=None, rms_norm_eps=1e-6, max_position_embeddings=4096),
}
QWEN2_VL_VISION = {"full": dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4),
                   "tiny": dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2)}
MROPE_SECTION = {"full": [16, 24, 24], "tiny": [2, 3, 3]}  # sums to head_dim / 2
IMAGE_SIZE = {("qwen2-vl", "full"): 448, ("qwen2-vl", "tiny"): 56, ("llava", "full"): 336, ("llava", "tiny"): 16}
CLIP_VIT_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  patch_size=14, projection_dim=768)


def size_name(bench: dict) -> str:
    return "tiny" if bench["tiny"] else "full"


def has_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


# --------------------------------------------------------------------------------------------------------
# Images and chats
# --------------------------------------------------------------------------------------------------------

def draw(color: tuple, shape: str, background: tuple, size: int):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), background)
    pen, a, b = ImageDraw.Draw(image), size // 5, size - size // 5
    if shape == "circle":
        pen.ellipse([a, a, b, b], fill=color)
    elif shape == "square":
        pen.rectangle([a, a, b, b], fill=color)
    elif shape == "triangle":
        pen.polygon([(size // 2, a), (a, b), (b, b)], fill=color)
    else:
        w = max(1, size // 10)
        pen.rectangle([size // 2 - w, a, size // 2 + w, b], fill=color)
        pen.rectangle([a, size // 2 - w, b, size // 2 + w], fill=color)
    return image


def write_image_chats(folder: Path, size: int, rows: int, seed: int = 0) -> tuple[Path, dict]:
    """PNG images of every (colour, shape, background) and `rows` chats about them, in random order."""
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for color, rgb in COLORS.items():
        for shape in SHAPES_DRAWN:
            for background, bg in BACKGROUNDS.items():
                path = folder / f"{color}-{shape}-{background}.png"
                if not path.exists():
                    draw(rgb, shape, bg, size).save(path)
                images.append((path, f"A {color} {shape} on a {background} background."))
    rng = random.Random(seed)
    chats = []
    for _ in range(rows):
        path, answer = rng.choice(images)
        chats.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": answer}]})
    data = folder.parent / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    return data, {"rows": rows, "images": len(images), "image_size": size}


def corpus() -> list[str]:
    return [" ".join(COLORS) + " " + " ".join(SHAPES_DRAWN) + " " + " ".join(BACKGROUNDS) + " " + QUESTION
            + " A on a background."]


# --------------------------------------------------------------------------------------------------------
# Models and processors
# --------------------------------------------------------------------------------------------------------

def qwen2_vl_tokenizer():
    """The tiny ChatML tokenizer with Qwen2-VL's special tokens and chat template."""
    from training_hub.tiny import build_tokenizer

    tokenizer = build_tokenizer(template=None, corpus=corpus())
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN2_VL_SPECIAL_TOKENS})
    tokenizer.chat_template = QWEN2_VL_TEMPLATE
    return tokenizer


def qwen2_vl_processor(tokenizer, image_size: int):
    """Qwen2-VL's processor. Without torchvision: the Pillow image processor and a stand-in video processor
    (the processor checks the class only; no video is processed here), which cannot be saved and reloaded."""
    from transformers import Qwen2VLProcessor

    pixels = dict(min_pixels=56 * 56, max_pixels=image_size * image_size)
    if has_torchvision():
        from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        image_processor, video_processor = Qwen2VLImageProcessor(**pixels), Qwen2VLVideoProcessor()
    else:
        from transformers import Qwen2VLImageProcessorPil

        expected = Qwen2VLProcessor.get_possibly_dynamic_module("BaseVideoProcessor")

        class NoVideoProcessor(expected):
            merge_size = 2

            def __init__(self):  # the torchvision-less placeholder class takes no settings
                pass

        image_processor, video_processor = Qwen2VLImageProcessorPil(**pixels), NoVideoProcessor()
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                            chat_template=QWEN2_VL_TEMPLATE)


def qwen2_vl_config(tokenizer, size: str):
    from transformers import Qwen2VLConfig

    text = dict(TEXT_SHAPES[size])
    text["vocab_size"] = text["vocab_size"] or len(tokenizer)
    text.update(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": MROPE_SECTION[size]},
                tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    if size == "tiny":
        text["initializer_range"] = 64**-0.5  # as tiny.build_model: a random head that LoRA can sharpen
    vision = dict(QWEN2_VL_VISION[size], hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)


def llava_parts(size: str):
    """(processor, config) of the LLaVA family: tiny.build_vision_processor's tokenizer and template."""
    from transformers import CLIPVisionConfig, LlavaConfig, Qwen2Config

    from training_hub.tiny import build_vision_processor

    image_size = IMAGE_SIZE[("llava", size)]
    patch = 8 if size == "tiny" else 14
    processor = build_vision_processor(corpus=corpus(), image_size=image_size, patch_size=patch)
    tokenizer = processor.tokenizer
    text = dict(TEXT_SHAPES[size])
    text["vocab_size"] = text["vocab_size"] or len(tokenizer)
    text.update(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if size == "tiny":
        text["initializer_range"] = 64**-0.5
    vision = (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
              if size == "tiny" else CLIP_VIT_L)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**{**vision, "image_size": image_size, "patch_size": patch}),
                         text_config=Qwen2Config(**text), image_token_index=processor.image_token_id,
                         vision_feature_layer=-2 if size == "full" else -1, vision_feature_select_strategy="default",
                         tie_word_embeddings=True)
    return processor, config


def build_and_save(family: str, bench: dict, folder: Path) -> dict:
    """Build the family's random-init model (bf16, on the GPU when there is one) and save it with its processor."""
    import torch
    from transformers import AutoModelForImageTextToText

    from training_hub.tiny import pad_vocabulary

    size = size_name(bench)
    if family == "qwen2-vl":
        processor = qwen2_vl_processor(qwen2_vl_tokenizer(), IMAGE_SIZE[(family, size)])
        config = qwen2_vl_config(processor.tokenizer, size)
    else:
        processor, config = llava_parts(size)
    # A real-shaped embedding (151,936 rows) with the small trained tokenizer: filler tokens make up the vocabulary.
    processor.tokenizer = pad_vocabulary(processor.tokenizer, config.text_config.vocab_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    report = {"parameters": sum(p.numel() for p in model.parameters()), "model_class": type(model).__name__}
    del model
    return report


def prepare(family: str, bench: dict) -> dict:
    import torch

    start = time.perf_counter()
    work = Path(bench["work"]) / family
    size = size_name(bench)
    data, data_info = write_image_chats(work / "images", IMAGE_SIZE[(family, size)],
                                        int((bench["warmup"] + bench["steps"]) * bench["batch"] * 1.2) + 8)
    report = {"family": family, "device": "cuda" if torch.cuda.is_available() else "cpu",
              "gpu_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
              "torchvision": has_torchvision(), "data": data_info, "data_path": str(data)}
    if family == "qwen2-vl" and not has_torchvision():
        report["cpu_check"] = qwen2_vl_cpu_check(bench, data)
    else:
        report["model"] = build_and_save(family, bench, work / "model")
        report["model_path"] = str(work / "model")
    report["seconds"] = time.perf_counter() - start
    return report


# --------------------------------------------------------------------------------------------------------
# Qwen2-VL without torchvision: what can run here
# --------------------------------------------------------------------------------------------------------

def no_checkpoints_callback():
    """A TrainerCallback that cancels checkpoints: they save the processor, which the stand-in video processor of a
    torchvision-less machine cannot be."""
    from transformers import TrainerCallback

    class NoCheckpoints(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_save = False

    return NoCheckpoints()


def qwen2_vl_cpu_check(bench: dict, data: Path) -> dict:
    """The Qwen2-VL path of lora_sft minus reloading the processor (not possible here): config and detection, the
    plan, tokenization and masking, the collator's batch, the model loaded from its folder with LoRA on the towers
    `finetune_vision_layers=True` picks (models.peft), 16-bit and 4-bit, and training through training_hub's
    trainer."""
    import torch
    from transformers import AutoModelForImageTextToText

    from training_hub import data as th_data
    from training_hub import hardware, training
    from training_hub.config import LoraSFTConfig
    from training_hub.data.vision import VisionCollator, image_token_id, tokenize_vision_examples
    from training_hub.models.peft import load_peft_model
    from training_hub.models.vision import is_vision_language, plan_config, vision_plan
    from training_hub.plan import ModelShape, make_plan

    size, folder = size_name(bench), Path(bench["work"]) / "qwen2-vl" / "model"
    processor = qwen2_vl_processor(qwen2_vl_tokenizer(), IMAGE_SIZE[("qwen2-vl", size)])
    model_config = qwen2_vl_config(processor.tokenizer, size)
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(model_config, dtype=torch.float32).save_pretrained(folder)
    shape = ModelShape.from_config(model_config)
    report: dict = {"is_vision_language": is_vision_language(model_config.to_dict()), "shape": shape.__dict__}
    tokenized = tokenize_vision_examples(th_data.load_examples(str(data), images=True), processor,
                                         max_seq_len=bench["seq"])
    rows, image_id = tokenized.dataset, image_token_id(processor)
    ids, labels = torch.tensor(rows[0]["input_ids"]), torch.tensor(rows[0]["labels"])
    report.update(rows_out=len(rows), template_note=tokenized.summary.template_note,
                  image_tokens_in_row=int((ids == image_id).sum()),
                  image_tokens_unsupervised=bool((labels[ids == image_id] == -100).all()),
                  supervised_text=processor.tokenizer.decode(ids[labels != -100]))
    collate = VisionCollator(processor, bench["seq"])
    report["batch"] = {k: list(v.shape) for k, v in collate([rows[i] for i in range(min(4, len(rows)))]).items()}
    for quantized in (False, True):
        config = LoraSFTConfig(model_path=str(folder), data_path=str(data), ckpt_output_dir=str(folder.parent / "run"),
                               finetune_vision_layers=True, max_steps=bench["warmup"] + bench["steps"],
                               effective_batch_size=bench["batch"], learning_rate=1e-2, logging_steps=1,
                               load_in_4bit=quantized)
        plan = vision_plan(make_plan(plan_config(config), hardware.detect(), "peft", shape, 1, tokenized.summary))
        loaded = load_peft_model(config, plan, processor, vision=True)
        adapted = {n: type(m).__name__ for n, m in loaded.model.named_modules() if n.endswith(".base_layer")}
        trainer = training.build_trainer(loaded.model, processor, rows, None, config, plan, folder.parent / "run",
                                         [no_checkpoints_callback()], collate)
        trainer.train()
        report["4bit" if quantized else "16bit"] = {
            "adapted_visual": sum(".visual.blocks." in n for n in adapted),
            "adapted_language": sum(".language_model.layers." in n for n in adapted),
            "adapted_other": [n for n in adapted if ".visual.blocks." not in n and ".language_model.layers." not in n],
            "adapted_classes": sorted(set(adapted.values())),
            "losses": [round(row["loss"], 4) for row in trainer.state.log_history if "loss" in row],
            "plan": {"backend": plan.backend, "dtype": plan.dtype, "micro_batch_size": plan.micro_batch_size,
                     "sample_packing": plan.sample_packing, "liger_kernel": plan.liger_kernel}}
    return report


# --------------------------------------------------------------------------------------------------------
# One row (own subprocess)
# --------------------------------------------------------------------------------------------------------

def saved_check(run_dir: Path) -> dict:
    """What the output folder holds: LoRA weights of each tower (from the adapter file's keys) and the processor."""
    from safetensors import safe_open

    with safe_open(str(run_dir / "adapter_model.safetensors"), "pt") as f:
        keys = [k for k in f.keys() if ".lora_A." in k]
    return {"adapted_vision": sum(any(f".{root}." in k for root in ("visual", "vision_tower")) for k in keys),
            "adapted_language": sum(".language_model." in k for k in keys),
            "processor_files": sorted(p.name for p in run_dir.glob("*processor*"))}


def loaded_check(run_dir: Path, data: Path, cuda: bool) -> dict:
    """training_hub.load returns the adapter on its base and the processor, which runs a forward on an image chat."""
    import torch

    import training_hub
    from training_hub.data.images import open_image

    model, processor = training_hub.load(run_dir, device="cuda" if cuda else None)
    chat = json.loads(data.read_text().splitlines()[0])["messages"]
    text = processor.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[open_image(chat[0]["content"][0]["image"])], return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    with torch.no_grad():
        logits = model(**inputs).logits
    return {"model_class": type(model).__name__, "processor_class": type(processor).__name__,
            "logits_finite": bool(torch.isfinite(logits).all())}


def run_row(name: str, bench: dict) -> dict:
    family, precision = name.rsplit("-", 1)
    prep = json.loads((Path(bench["out"]) / f"prepare-{family}.json").read_text())
    import torch

    import training_hub
    from training_hub.checkpoints import read_metric_rows

    cuda = torch.cuda.is_available()
    run_dir = Path(bench["work"]) / "runs" / name
    timer = throughput.make_timer(cuda)
    report: dict = {"name": name}
    total = bench["warmup"] + bench["steps"]
    try:
        result = training_hub.lora_sft(
            model_path=prep["model_path"], data_path=prep["data_path"], ckpt_output_dir=str(run_dir),
            finetune_vision_layers=True, load_in_4bit=precision == "4bit", max_steps=total,
            effective_batch_size=bench["batch"], logging_steps=1, overwrite_output_dir=True, callbacks=[timer])
        keep = ("backend", "dtype", "micro_batch_size", "gradient_accumulation_steps", "sample_packing",
                "gradient_checkpointing", "optim", "attn_implementation", "liger_kernel", "notes")
        report.update(plan={k: result.plan.get(k) for k in keep}, data_summary=result.data_summary,
                      lora_sft_tokens_per_s=result.metrics.get("tokens_per_second"))
        report.update(throughput.measure(timer, bench["warmup"]))
        report["losses"] = [row["loss"] for row in read_metric_rows(run_dir / "training_metrics.jsonl")
                            if isinstance(row.get("loss"), (int, float))]
        report["saved"] = saved_check(run_dir)
        if precision == "bf16":  # the 4-bit row's adapter loads the same way (onto the 16-bit base): time saved
            report["load"] = loaded_check(run_dir, Path(prep["data_path"]), cuda)
    except Exception as exc:  # recorded in the table; the other rows still run
        traceback.print_exc()
        report["error"] = f"{type(exc).__name__}: {str(exc).strip()[:400]}"
    if cuda:
        report["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
        report["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    report["unsloth_in_process"] = "unsloth" in sys.modules
    return report


# --------------------------------------------------------------------------------------------------------
# Orchestration and results (parent: no torch)
# --------------------------------------------------------------------------------------------------------

def loss_falls(losses: list[float]) -> bool | None:
    if len(losses) < 4:
        return None
    k = min(3, len(losses) // 3)
    return sum(losses[-k:]) / k < sum(losses[:k]) / k


def row_checks(row: dict) -> dict:
    saved, load = row.get("saved") or {}, row.get("load") or {}
    return {"loss falls": loss_falls(row.get("losses") or []), "vision + language adapted":
            bool(saved.get("adapted_vision") and saved.get("adapted_language")) if saved else None,
            "processor saved": bool(saved.get("processor_files")) if saved else None,
            "load + forward": load.get("logits_finite") if load else None}


def cpu_check_lines(check: dict) -> list[str]:
    return ["", "Qwen2-VL checks without torchvision (no lora_sft: its processor cannot be reloaded here):",
            f"- detected as vision-language: {check['is_vision_language']}; {check['rows_out']} rows tokenized; "
            f"{check['image_tokens_in_row']} image tokens in row 1, all unsupervised: {check['image_tokens_unsupervised']}",
            f"- supervised text of row 1: {check['supervised_text']!r}",
            f"- collator batch: {check['batch']}",
            *[f"- {kind}: LoRA on {run['adapted_visual']} visual-block and {run['adapted_language']} language-layer "
              f"linears ({', '.join(run['adapted_classes'])}), elsewhere {run['adapted_other']}; training_hub's trainer "
              f"(SFTTrainer, VisionCollator, lr 1e-2), plan {run['plan']}: loss {run['losses'][0]} -> "
              f"{run['losses'][-1]} ({run['losses']})" for kind, run in ((k, check[k]) for k in ("16bit", "4bit"))]]


def render(bench: dict, preps: dict, rows: list[dict], vers: dict) -> str:
    gpu = next((p.get("gpu_name") for p in preps.values() if p), "?")
    lines = [f"# Vision-language LoRA ({'tiny' if bench['tiny'] else 'full'} shapes, random init)", "",
             f"- date: {bench['date']}", f"- device: {gpu}", "- versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
             f"- call: lora_sft(finetune_vision_layers=True, max_steps={bench['warmup'] + bench['steps']}, "
             f"effective_batch_size={bench['batch']}, logging_steps=1[, load_in_4bit=True]); everything else default",
             f"- tokens/s: non-padding tokens (image tokens included) of the steps after the first {bench['warmup']}"]
    for family, prep in preps.items():
        if prep and prep.get("model"):
            lines.append(f"- {family}: {prep['model']['model_class']}, {prep['model']['parameters'] / 1e9:.2f}B parameters; "
                         f"{prep['data']['rows']} chats over {prep['data']['images']} images of {prep['data']['image_size']} px")
        elif prep and prep.get("error"):
            lines.append(f"- {family}: preparation failed: {prep['error'][:300]}")
    lines += ["", "| row | tokens/s | peak GiB alloc / reserved | loss first -> last | loss falls | vision+language "
              "adapted | processor saved | load + forward | plan |", "|---|---:|---:|---:|---|---|---|---|---|"]
    for row in rows:
        if row.get("error"):
            status = "skipped" if row["error"].startswith("skipped") else "failed"
            lines.append(f"| {row['name']} | {status} | {throughput.fmt(row.get('peak_alloc_gib'), '.2f')} | - | - | - | - | - | "
                         f"{row['error'][:200]} |")
            continue
        losses, checks = row.get("losses") or [None], row_checks(row)
        mark = {True: "yes", False: "NO", None: "-"}
        lines.append(f"| {row['name']} | {throughput.fmt(row.get('tokens_per_s'), ',.0f')} | "
                     f"{throughput.fmt(row.get('peak_alloc_gib'), '.2f')} / {throughput.fmt(row.get('peak_reserved_gib'), '.2f')} | "
                     f"{throughput.fmt(losses[0], '.3f')} -> {throughput.fmt(losses[-1], '.3f')} | "
                     + " | ".join(mark[v] for v in checks.values()) + f" | {throughput.plan_text(row.get('plan', {}))} |")
    for prep in preps.values():
        if prep and prep.get("cpu_check"):
            lines += cpu_check_lines(prep["cpu_check"])
    return "\n".join(lines) + "\n"


def write_results(out: Path, bench: dict, preps: dict, rows: list[dict], vers: dict) -> str:
    text = render(bench, preps, rows, vers)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"bench": bench, "prepare": preps, "versions": vers, "rows": rows},
                                                 indent=2, default=str))
    return text


def main_parent(args) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else out / "work"
    families = [f.strip() for f in args.family.split(",") if f.strip()]
    if any(f not in FAMILIES for f in families):
        raise SystemExit(f"--family: {families}; valid: {', '.join(FAMILIES)}")
    bench = {"tiny": args.tiny, "steps": args.steps or (6 if args.tiny else 20),
             "warmup": args.warmup if args.warmup is not None else (2 if args.tiny else 3),
             "batch": args.batch or (4 if args.tiny else 8), "seq": 2048, "out": str(out), "work": str(work),
             "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    (out / "bench.json").write_text(json.dumps(bench, indent=2))
    from training_hub.manifest import package_versions  # light: no torch

    vers = {k: v for k, v in package_versions().items() if k != "training-hub-lora"}
    me, start = Path(__file__).resolve(), time.perf_counter()
    preps: dict[str, dict | None] = {}
    rows: list[dict] = []

    def time_for(limit: float) -> float | None:
        """A child's timeout: its own limit, cut to what is left of --total-timeout (0 when under 30 s is left)."""
        if not args.total_timeout:
            return limit or None
        left = args.total_timeout - (time.perf_counter() - start)
        return 0 if left < 30 else min(limit or left, left)

    for family in families:
        if time_for(args.prepare_timeout) == 0:
            preps[family] = {"error": "skipped: --total-timeout reached"}
            continue
        prep, detail = throughput.run_child(["--run-prepare", family, "--out", str(out)],
                                            out / "logs" / f"prepare-{family}.log", PREPARE_MARK,
                                            time_for(args.prepare_timeout), script=me)
        preps[family] = prep or {"error": detail}
        print(f"vision: prepared {family}: {detail if prep is None else 'ok'} [{time.perf_counter() - start:.0f} s]",
              flush=True)
        if prep is None or "model_path" not in prep:
            write_results(out, bench, preps, rows, vers)
            continue
        (out / f"prepare-{family}.json").write_text(json.dumps(prep))
        for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
            name, row_start = f"{family}-{precision}", time.perf_counter()
            if time_for(args.row_timeout) == 0:
                rows.append({"name": name, "error": "skipped: --total-timeout reached"})
                continue
            report, detail = throughput.run_child(["--run-row", name, "--out", str(out)], out / "logs" / f"{name}.log",
                                                  ROW_MARK, time_for(args.row_timeout), script=me)
            report = report or {"name": name, "error": detail}
            report["wall_seconds"] = time.perf_counter() - row_start
            rows.append(report)
            status = report.get("error") or f"{throughput.fmt(report.get('tokens_per_s'), ',.0f')} tokens/s, checks {row_checks(report)}"
            print(f"vision: row {name}: {status} [{report['wall_seconds']:.0f} s]", flush=True)
            write_results(out, bench, preps, rows, vers)
    text = write_results(out, bench, preps, rows, vers)
    print(f"\n{text}\nvision: {out / 'results.md'} written [total {time.perf_counter() - start:.0f} s]", flush=True)
    ok_rows = all(not r.get("error") and all(v is not False for v in row_checks(r).values()) for r in rows)
    return 0 if ok_rows and all(p and not p.get("error") for p in preps.values()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for results and logs")
    parser.add_argument("--work", help="folder for models, images and runs (default: OUT/work)")
    parser.add_argument("--family", default=",".join(FAMILIES), help="comma-separated, in order (default: qwen2-vl,llava)")
    parser.add_argument("--precisions", default="bf16,4bit", help="rows per family: bf16, 4bit (default both)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shapes, 2 + 6 steps")
    parser.add_argument("--steps", type=int, help="measured optimizer steps (default 20; 6 with --tiny)")
    parser.add_argument("--warmup", type=int, help="warm-up steps, not timed (default 3; 2 with --tiny)")
    parser.add_argument("--batch", type=int, help="effective_batch_size (default 8; 4 with --tiny)")
    parser.add_argument("--row-timeout", type=float, default=0, help="seconds per row before it is killed (0: none)")
    parser.add_argument("--prepare-timeout", type=float, default=0, help="seconds per family's preparation (0: none)")
    parser.add_argument("--total-timeout", type=float, default=0, help="seconds for everything: each child's limit is "
                        "cut to what is left, and what cannot start with 30 s left is skipped (0: none)")
    parser.add_argument("--run-row", help=argparse.SUPPRESS)
    parser.add_argument("--run-prepare", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_row or args.run_prepare:
        bench = json.loads((Path(args.out) / "bench.json").read_text())
        if args.run_prepare:
            try:
                report = prepare(args.run_prepare, bench)
            except Exception as exc:
                traceback.print_exc()
                report = {"family": args.run_prepare, "error": f"{type(exc).__name__}: {str(exc).strip()[:400]}"}
            print(PREPARE_MARK + json.dumps(report, default=str), flush=True)
        else:
            print(ROW_MARK + json.dumps(run_row(args.run_row, bench), default=str), flush=True)
        return 0
    return main_parent(args)


if __name__ == "__main__":
    sys.exit(main())
