"""A tiny, randomly initialised CLIP saved as a Hugging Face folder, for fast tests of the CLIP code path.

Nothing is downloaded: the tokenizer vocabulary is written out by hand (single characters plus a few
merges), and the image processor is configured to 32×32 inputs.
"""

from __future__ import annotations

import string
from pathlib import Path


def build_tiny_clip(folder: Path, *, seed: int = 0) -> Path:
    """Write a ~100 kB CLIP (transformers format, with processor) to ``folder`` and return it."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    specials = ["<|startoftext|>", "<|endoftext|>"]
    # Byte-level BPE sees every printable ASCII character; word-final forms carry the "</w>" suffix.
    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("a", "r</w>"), ("c", "ar</w>")]
    tokens = specials + chars + [c + "</w>" for c in chars] + ["ca", "cat</w>", "do", "dog</w>", "ar</w>", "car</w>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=32)

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        do_resize=True,
        do_center_crop=True,
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)

    text = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
