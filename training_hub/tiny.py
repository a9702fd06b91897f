"""Tiny offline models and tokenizers of real architectures.

The quickstart and the tests need a model and a tokenizer without a model hub. This module builds
both in about a second: a byte-level BPE tokenizer trained on the spot (with real chat templates)
and a randomly initialised Qwen2 or Llama model of a few hundred thousand parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal

# ChatML, as used by Qwen and many others: each turn ends with <|im_end|> and a newline.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2.5's behaviour: a default system prompt is injected when the conversation has none.
CHATML_DEFAULT_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}" + CHATML_TEMPLATE
)

# Llama-3 style: a BOS token rendered by the template itself, header ids, <|eot_id|> ends a turn.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

CHAT_TEMPLATES = {
    "chatml": CHATML_TEMPLATE,
    "chatml_default_system": CHATML_DEFAULT_SYSTEM_TEMPLATE,
    "llama3": LLAMA3_TEMPLATE,
}

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

_BASE_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Hello, how are you today? I am fine, thank you. "
    "What is the capital of France? The capital of France is Paris. 0 1 2 3 4 5 6 7 8 9 + - * / = "
    "system user assistant human gpt instruction input output You are a helpful assistant. "
)


def build_tokenizer(
    template: Literal["chatml", "chatml_default_system", "llama3"] | None = "chatml",
    corpus: Iterable[str] = (),
    vocab_size: int = 512,
):
    """Train a byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``.

    Args:
        template: name of a chat template in ``CHAT_TEMPLATES``, or None for a tokenizer without one.
        corpus: extra training text (e.g. the dataset), so its words become single tokens.
        vocab_size: BPE vocabulary size, special tokens included.

    Any text can be encoded (byte-level alphabet), and offsets are exact, which the loss masking needs.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([_BASE_CORPUS, *corpus], trainer=trainer)

    llama = template == "llama3"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>" if llama else None,
        eos_token="<|eot_id|>" if llama else "<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        clean_up_tokenization_spaces=False,
    )
    if template is not None:
        tokenizer.chat_template = CHAT_TEMPLATES[template]
    return tokenizer


def build_model(
    tokenizer,
    architecture: Literal["qwen2", "llama"] = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
):
    """Build a randomly initialised causal LM of a real architecture, sized for the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # The usual 0.02 caps a frozen random LM head's logits near 1 at this width, so nothing a LoRA
        # learns could show in the loss; 1/sqrt(hidden) lets the output distribution sharpen.
        initializer_range=hidden_size**-0.5,
    )
    config = Qwen2Config(**common) if architecture == "qwen2" else LlamaConfig(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_random_model(config, tokenizer, output_dir: str | Path, device: str = "cpu", dtype: str = "bfloat16") -> Path:
    """Build a randomly initialised causal LM from `config` directly on `device`, save it (safetensors) with
    `tokenizer`, and free it. Used for benchmark- and GPU-test-sized models (billions of parameters)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output_dir, safe_serialization=True)
    pad_vocabulary(tokenizer, config.vocab_size).save_pretrained(output_dir)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return Path(output_dir)


def pad_vocabulary(tokenizer, size: int):
    """The tokenizer with unreachable filler tokens appended to its BPE vocabulary (no merge produces them) up to
    `size` entries, so that a small trained tokenizer fits a real-shaped model's embedding as a real vocabulary does
    (lora_sft refuses a tokenizer far smaller than the embedding as another model's). Encoding, special tokens and
    the chat template are unchanged (the tokenizer is saved, its tokenizer.json extended and loaded again)."""
    import json
    import tempfile

    from transformers import AutoTokenizer

    if len(tokenizer) >= size:
        return tokenizer
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        path = Path(folder) / "tokenizer.json"
        state = json.loads(path.read_text())
        vocab = state["model"]["vocab"]
        # Tokens added after training (e.g. "<image>") enter the BPE vocabulary at their ids: on loading, an added
        # token missing from it would be renumbered after the vocabulary's end, onto a filler's id.
        vocab.update({token["content"]: token["id"] for token in state["added_tokens"]})
        taken = set(vocab.values())
        for index, token_id in enumerate(i for i in range(size) if i not in taken):
            vocab[f"<|filler_{index}|>"] = token_id
        path.write_text(json.dumps(state))
        return AutoTokenizer.from_pretrained(folder)


def save_tiny_model(
    output_dir: str | Path,
    architecture: Literal["qwen2", "llama"] = "qwen2",
    template: Literal["chatml", "chatml_default_system", "llama3"] | None = "chatml",
    corpus: Iterable[str] = (),
    hidden_size: int = 64,
    num_layers: int = 2,
) -> Path:
    """Build a tokenizer and a tiny model and save both (safetensors) to ``output_dir``."""
    output_dir = Path(output_dir)
    tokenizer = build_tokenizer(template=template, corpus=corpus)
    model = build_model(tokenizer, architecture=architecture, hidden_size=hidden_size, num_layers=num_layers)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


# ChatML whose user turns may hold a list of text and image parts; each image is LLaVA's "<image>" placeholder.
CHATML_IMAGE_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IMAGE_TOKEN = "<image>"


def build_vision_processor(corpus: Iterable[str] = (), image_size: int = 16, patch_size: int = 8):
    """A LLaVA processor: the ChatML tokenizer with an ``<image>`` token and an image-aware template, and CLIP's
    Pillow image processor (no torchvision). Each image becomes (image_size / patch_size)² image tokens."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    tokenizer = build_tokenizer(template=None, corpus=corpus)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = CHATML_IMAGE_TEMPLATE
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHATML_IMAGE_TEMPLATE)


def build_vision_model(processor, hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    """A randomly initialised LLaVA (Llama text model + CLIP vision encoder) sized for ``processor``."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    size = processor.image_processor.crop_size["height"]
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=2,
                              image_size=size, patch_size=processor.patch_size, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                       num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
                       initializer_range=hidden_size**-0.5)  # as build_model: a random head that LoRA can sharpen
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)


def save_tiny_vision_model(output_dir: str | Path, corpus: Iterable[str] = ()) -> Path:
    """Build a tiny LLaVA and its processor and save both to ``output_dir`` (loadable with
    ``AutoModelForImageTextToText`` and ``AutoProcessor``)."""
    output_dir = Path(output_dir)
    processor = build_vision_processor(corpus=corpus)
    build_vision_model(processor).save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir
