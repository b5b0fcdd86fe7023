"""Byte-level tokenizer: UTF-8 bytes are the tokens (vocabulary 256); nothing to download."""

from __future__ import annotations

import torch


def encode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def decode(ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
