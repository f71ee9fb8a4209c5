"""Text example factories: a small seeded transformer language model, its student and synthetic padded sentences.

A worked example of distilling a text model from padded batches (``pipelines/text.toml``; README, *Distilling a text
model*). Only torch and numpy are needed: the teacher's weights and the sentences are made from seeds, nothing is
downloaded. Copy it and put your own model and tokenized dataset in place of these.

* ``teacher()`` -- embedding + learned positions, a 2-layer ``torch.nn.TransformerEncoder`` (d_model 32, 4 heads) run
  with ``src_key_padding_mask`` from the attention mask, ``final_norm`` (its output is the ``last_hidden_state``,
  ``(batch, tokens, 32)``) and a per-token LM head tied to the token embedding: ``forward(input_ids, attention_mask)`` gives ``(batch, tokens, VOCAB)``
  logits. Seeded (``TEACHER_SEED``) without touching the global RNG; returned in eval mode.
* ``student()`` -- the same interface, 1 layer of d_model 16 (4,368 parameters against the teacher's 21,312); its ``final_norm`` is
  16 wide, so kdcache trains a linear projection head 16 -> 32 for the pooled-feature term.
* ``dataset(split)`` -- ``SENTENCES`` synthetic sentences per split (``"train"``, ``"val"``, ``"test"``), 4 to
  ``PAD_TO`` tokens each, right-padded with ``PAD_ID`` to ``PAD_TO`` positions: items
  ``{"input_ids": int64 [PAD_TO], "attention_mask": int64 [PAD_TO]}`` (1 where a token counts, as a Hugging Face
  tokenizer gives it). kdcache batches items with ``default_collate``, so every item has the same length: pad in the
  dataset. ``dataset_padded_wider(split)`` holds the same sentences padded to ``WIDER`` positions.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

VOCAB = 64  # token ids 0..63; 0 is the pad token
PAD_ID = 0
PAD_TO = 24  # positions per item
WIDER = 40  # dataset_padded_wider's positions
MAX_POSITIONS = 64  # learned position embeddings: enough for either padding
SENTENCES = 192  # per split
MIN_TOKENS = 4
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}
TEACHER_SEED = 1234

__all__ = ["teacher", "student", "dataset", "dataset_padded_wider", "TinyLM", "SyntheticSentences",
           "VOCAB", "PAD_ID", "PAD_TO", "WIDER", "SENTENCES"]


# ----------------------------------------------------------------------------- models

class TinyLM(nn.Module):
    """Token + position embeddings, a batch-first TransformerEncoder, ``final_norm`` and a per-token LM head."""

    def __init__(self, d_model: int, layers: int, heads: int, max_positions: int = MAX_POSITIONS) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, d_model)
        self.positions = nn.Embedding(max_positions, d_model)  # items of up to max_positions tokens
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True)
        # enable_nested_tensor=False: in eval mode with a padding mask the encoder would otherwise pass a nested tensor
        # (no per-sample shape) between its layers, which kdcache refuses to store from a hooked layer.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(d_model)  # its output: the last hidden state, (B, T, d_model)
        self.lm_head = nn.Linear(d_model, VOCAB)
        self.lm_head.weight = self.tokens.weight  # tied, as GPT-2's: peaked next-token distributions from random weights

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tokens(input_ids) + self.positions(positions)  # (B, T, D)
        # PyTorch's key padding mask is true where a position is padding: the opposite of the attention mask
        x = self.encoder(x, src_key_padding_mask=attention_mask == 0)
        return self.lm_head(self.final_norm(x))  # (B, T, VOCAB)


def teacher() -> nn.Module:
    """The seeded 2-layer teacher (d_model 32) in eval mode; the global torch RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TEACHER_SEED)
        model = TinyLM(d_model=32, layers=2, heads=4)
    return model.eval()


def student() -> nn.Module:
    """A fresh 1-layer student (d_model 16), initialised by the current torch RNG (train.seed)."""
    return TinyLM(d_model=16, layers=1, heads=2)


# ----------------------------------------------------------------------------- data

class SyntheticSentences(torch.utils.data.Dataset):
    """``SENTENCES`` token sequences of ``MIN_TOKENS``..``PAD_TO`` tokens from a seeded bigram chain (each token is likely
    to follow from the one before, so there is structure to learn), right-padded to ``width`` positions."""

    def __init__(self, split: str, width: int = PAD_TO) -> None:
        if split not in SPLIT_SEEDS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_SEEDS)}")
        rng = np.random.default_rng(SPLIT_SEEDS[split])
        lengths = rng.integers(MIN_TOKENS, PAD_TO + 1, size=SENTENCES)
        self.ids = np.full((SENTENCES, width), PAD_ID, dtype=np.int64)
        for i, length in enumerate(lengths):
            self.ids[i, :length] = _sentence(rng, int(length))
        self.mask = (np.arange(width) < lengths[:, None]).astype(np.int64)  # (N, width): 1 at tokens, 0 at padding

    def __len__(self) -> int:
        return SENTENCES

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.from_numpy(self.ids[index].copy()), "attention_mask": torch.from_numpy(self.mask[index].copy())}


def _sentence(rng: np.random.Generator, length: int) -> np.ndarray:
    """``length`` token ids in 1..VOCAB-1: mostly the previous token times 5 plus 3 (mod VOCAB - 1), sometimes random."""
    tokens = [int(rng.integers(1, VOCAB))]
    for _ in range(length - 1):
        follow = (tokens[-1] * 5 + 3) % (VOCAB - 1) + 1
        tokens.append(follow if rng.random() < 0.7 else int(rng.integers(1, VOCAB)))
    return np.array(tokens, dtype=np.int64)


def dataset(split: str) -> torch.utils.data.Dataset:
    """The ``split``'s sentences padded to ``PAD_TO`` positions."""
    return SyntheticSentences(split)


def dataset_padded_wider(split: str) -> torch.utils.data.Dataset:
    """The same sentences padded to ``WIDER`` positions: their pooled targets by ``targets.mask`` are ``dataset``'s."""
    return SyntheticSentences(split, width=WIDER)
