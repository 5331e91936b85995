"""A small GPT-style character language model (nanoGPT's architecture, scaled down)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from truegrad.optim import TGAdamW
from truegrad_lightning.models.base import TrueGradModule

__all__ = ["CharGPT"]

Norm = Literal["layer", "rms"]


def _norm(kind: Norm, dim: int) -> nn.Module:
    return nn.LayerNorm(dim) if kind == "layer" else nn.RMSNorm(dim)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``(B, T, D) -> (B, T, D)``.

    One ``Linear(D, 3D)`` gives queries, keys and values; ``scaled_dot_product_attention``
    with a causal mask; one ``Linear(D, D)`` projects the heads back.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``
    with a ``D -> 4D -> D`` GELU MLP."""

    def __init__(self, dim: int, heads: int, dropout: float, norm: Norm) -> None:
        super().__init__()
        self.norm1 = _norm(norm, dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.norm2 = _norm(norm, dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CharGPT(TrueGradModule):
    r"""GPT-style character LM: token and position embeddings, ``n_layer`` pre-norm blocks
    of causal self-attention and MLP, a final norm and a head tied to the token embedding.

    ``forward(ids)`` maps token ids ``(B, T)``, ``T <= block_size``, to logits
    ``(B, T, vocab_size)``. The loss is the mean next-character cross-entropy over all
    ``B*T`` positions; ``train_loss``/``val_loss``/``test_loss`` are logged in nats and
    ``val_bpc`` in bits per character (``val_loss / ln 2``); validation and test metrics
    are averaged over all ranks under DDP (``sync_dist=True``). ``predict`` writes
    :meth:`prediction_rows` (see :class:`~truegrad_lightning.predictions.PredictionCSVWriter`).

    Position embeddings are looked up with positions expanded to ``(B, T)``, so every
    sample owns its rows of the embedding's gradient (each backend computes the exact
    per-sample statistic, none needs a broadcast over the batch).

    Args:
        vocab_size: number of distinct characters; ``None`` takes ``vocab_size`` of the
            Trainer's datamodule in ``configure_model`` (the layers are built there, and
            the value is written to ``hparams`` so checkpoints record it).
        block_size: longest context (positions of the position embedding).
        n_layer, n_head, n_embd: depth, attention heads and width
            (``n_embd % n_head == 0``).
        dropout: dropout probability in attention and after each MLP.
        norm: ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm).
        tie_weights: share the head's weight with the token embedding.
        optimizer, lr_scheduler: see :class:`~truegrad_lightning.models.TrueGradModule`.
    """

    def __init__(
        self,
        vocab_size: int | None = None,
        block_size: int = 128,
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        norm: Norm = "layer",
        tie_weights: bool = True,
        optimizer: OptimizerCallable = TGAdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if n_embd % n_head:
            raise ValueError(f"CharGPT: n_embd={n_embd} must be divisible by n_head={n_head}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"CharGPT: dropout={dropout} must be in [0, 1)")
        for name, value in (("block_size", block_size), ("n_layer", n_layer), ("n_head", n_head)):
            if value < 1:
                raise ValueError(f"CharGPT: {name}={value} must be >= 1")
        if vocab_size is not None:
            self._build(vocab_size)

    @property
    def built(self) -> bool:
        return hasattr(self, "lm_head")

    def _build(self, vocab_size: int) -> None:
        if vocab_size < 1:
            raise ValueError(f"CharGPT: vocab_size={vocab_size} must be >= 1")
        h = self.hparams
        self.wte = nn.Embedding(vocab_size, h.n_embd)
        self.wpe = nn.Embedding(h.block_size, h.n_embd)
        self.drop = nn.Dropout(h.dropout)
        self.blocks = nn.ModuleList(
            Block(h.n_embd, h.n_head, h.dropout, h.norm) for _ in range(h.n_layer)
        )
        self.norm = _norm(h.norm, h.n_embd)
        self.lm_head = nn.Linear(h.n_embd, vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * h.n_layer))
        if h.tie_weights:
            self.lm_head.weight = self.wte.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def configure_model(self) -> None:
        if self.built:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        vocab_size = getattr(datamodule, "vocab_size", None)
        if not isinstance(vocab_size, int):
            raise ValueError(
                "CharGPT(vocab_size=None) takes vocab_size from the Trainer's datamodule, but "
                f"{type(datamodule).__name__} has none: pass model.vocab_size or use "
                "truegrad_lightning.data.CharDataModule"
            )
        self.hparams["vocab_size"] = vocab_size
        self._build(vocab_size)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data_block = getattr(datamodule, "block_size", None)
        if isinstance(data_block, int) and data_block > self.hparams.block_size:
            raise ValueError(
                f"data.block_size={data_block} is longer than model.block_size="
                f"{self.hparams.block_size}: the position embedding has no row for the "
                "later positions"
            )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.built:
            raise RuntimeError("CharGPT has no layers yet: give vocab_size or run it in a Trainer")
        b, t = ids.shape
        if t > self.hparams.block_size:
            raise ValueError(f"CharGPT: sequence length {t} > block_size={self.hparams.block_size}")
        positions = torch.arange(t, device=ids.device).expand(b, t)
        x = self.drop(self.wte(ids) + self.wpe(positions))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, targets = batch
        logits = self(ids)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        self.log("val_bpc", loss / math.log(2), sync_dist=True)
        return loss

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("test_loss", loss, sync_dist=True)
        self.log("test_bpc", loss / math.log(2), sync_dist=True)
        return loss

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Greedy next-character ids ``(B, T)`` for each position of the inputs."""
        ids = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(ids).argmax(-1)

    @torch.no_grad()
    def prediction_rows(
        self, batch: tuple[torch.Tensor, torch.Tensor] | torch.Tensor, predictions: torch.Tensor
    ) -> list[dict[str, str | float]]:
        """One row per window for :class:`~truegrad_lightning.predictions.PredictionCSVWriter`:
        ``context`` (the window's last 32 characters), ``target`` (the character that
        follows it, when the batch has targets), ``predicted`` (the greedy next character)
        and ``probability`` (its probability), and ``accuracy`` (the fraction of the
        window's positions whose greedy next character is right). Characters are decoded
        with the Trainer's datamodule's ``decode`` (ids as numbers without one); newlines,
        tabs and backslashes are escaped (``\\n``, ``\\t``, ``\\\\``)."""
        has_targets = isinstance(batch, (tuple, list)) and len(batch) > 1
        ids = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs = torch.softmax(self(ids)[:, -1].float(), dim=-1)
        last = predictions[:, -1].long()
        chosen = probs.gather(1, last[:, None])[:, 0].tolist()
        trainer = self._trainer
        decode = getattr(getattr(trainer, "datamodule", None), "decode", None)

        def text(seq: torch.Tensor) -> str:
            if decode is None:
                return " ".join(str(i) for i in seq.tolist())
            return decode(seq).replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")

        rows: list[dict[str, str | float]] = []
        for i in range(len(ids)):
            row: dict[str, str | float] = {"context": text(ids[i, -32:])}
            if has_targets:
                row["target"] = text(batch[1][i, -1:])
            row["predicted"] = text(last[i : i + 1])
            row["probability"] = round(chosen[i], 6)
            if has_targets:
                row["accuracy"] = round(float((predictions[i] == batch[1][i]).float().mean()), 6)
            rows.append(row)
        return rows

    @torch.no_grad()
    def generate(
        self,
        ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` characters after the prompt ``ids`` ``(B, T0)``;
        returns ``(B, T0 + max_new_tokens)``. ``temperature=0`` is greedy."""
        for _ in range(max_new_tokens):
            logits = self(ids[:, -self.hparams.block_size :])[:, -1]
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            ids = torch.cat([ids, nxt], dim=1)
        return ids
