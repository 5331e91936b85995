"""A model zoo built locally (no torchvision, no downloads) for backend tests.

Every entry builds a small float32 model from ``torch.nn`` (or Hugging Face
``transformers`` from a small config), an input batch, and a loss. Models whose samples
interact (BatchNorm in training mode) say so with ``samples_interact=True``; their
per-sample oracle is taken in eval mode or at the layer level.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ZOO", "ZooEntry"]


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], Any]  # a tensor, a tuple of args or a dict of kwargs
    loss: Callable[[Any, Any], torch.Tensor]
    targets: Callable[[], Any] = lambda: None
    samples_interact: bool = False
    #: which exact oracle applies: "func" (torch.func) or "loop" (one backward per sample,
    #: for models torch.func cannot run: data-dependent control flow, masks built from data)
    oracle: str = "func"


# ----------------------------------------------------------------------------- models


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5))


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU(inplace)-conv-BN, residual add, ReLU(inplace)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """A resnet18-shaped network at toy size (stem, two stages of basic blocks, head)."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tiny_alexnet(classes: int = 5) -> nn.Module:
    """An alexnet-shaped network at toy size: conv/ReLU(inplace)/MaxPool, then Linear layers."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(12 * 4 * 4, 32), nn.ReLU(inplace=True), nn.Linear(32, classes),
    )


def grouped_cnn(classes: int = 5) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.GELU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, groups=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(), nn.Linear(64, classes),
    )


class TransformerEncoder(nn.Module):
    """Token embedding + 2 ``nn.TransformerEncoderLayer`` (MHA, LayerNorm, GELU) + head."""

    def __init__(self, vocab: int = 20, dim: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder(self.embed(ids))).mean(1))


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class GPT(nn.Module):
    """nanoGPT-style LM: token + position embeddings, RMSNorm pre-norm blocks, tied head."""

    def __init__(self, vocab: int = 24, dim: int = 16, heads: int = 2, layers: int = 2, context: int = 8) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.norm1 = nn.RMSNorm(dim)
            block.attn = CausalSelfAttention(dim, heads)
            block.norm2 = nn.RMSNorm(dim)
            block.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
            self.blocks.append(block)
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input/output embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(positions)
        for block in self.blocks:
            x = x + block.attn(block.norm1(x))
            x = x + block.mlp(block.norm2(x))
        return self.lm_head(self.norm(x))


def bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(config)


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=30, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


# ----------------------------------------------------------------------------- losses


def _ce(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, target)


def _lm(out: Any, target: torch.Tensor) -> torch.Tensor:
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def _hidden(out: Any, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.last_hidden_state, target)


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("mlp", mlp, lambda: torch.randn(6, 12), _ce, lambda: torch.randint(0, 5, (6,))),
        ZooEntry("resnet", TinyResNet, lambda: torch.randn(4, 3, 8, 8), _ce,
                 lambda: torch.randint(0, 5, (4,)), samples_interact=True),
        ZooEntry("alexnet", tiny_alexnet, lambda: torch.randn(4, 3, 32, 32), _ce,
                 lambda: torch.randint(0, 5, (4,))),
        ZooEntry("grouped_cnn", grouped_cnn, lambda: torch.randn(4, 4, 9, 9), _ce,
                 lambda: torch.randint(0, 5, (4,))),
        ZooEntry("transformer", TransformerEncoder, lambda: torch.randint(0, 20, (4, 6)), _ce,
                 lambda: torch.randint(0, 5, (4,))),
        ZooEntry("gpt", GPT, lambda: torch.randint(0, 24, (3, 8)), _lm,
                 lambda: torch.randint(0, 24, (3, 8))),
        ZooEntry("bert", bert, lambda: {"input_ids": torch.randint(0, 30, (3, 7))}, _hidden,
                 lambda: torch.randn(3, 7, 16)),
        ZooEntry("gpt2", gpt2, lambda: {"input_ids": torch.randint(0, 30, (3, 7))}, _lm,
                 lambda: torch.randint(0, 30, (3, 7))),
    ]
}
