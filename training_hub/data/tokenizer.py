"""The tokenizer a run trains with: the model's own, given a pad token when it has none."""

from __future__ import annotations


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token: the EOS token when it has none (padding is never trained on,
    and the embeddings are never resized behind the user's back)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    pad_token_policy(tokenizer, model_path)
    return tokenizer


def pad_token_policy(tokenizer, model_path: str) -> None:
    """Give ``tokenizer`` the EOS token as its pad token when it has none; an error when it has neither."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"The tokenizer of {model_path} has neither a pad nor an EOS token; add one to it "
                             "(tokenizer.add_special_tokens) and save it before training")
        tokenizer.pad_token = tokenizer.eos_token
