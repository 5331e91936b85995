"""A zoo of tiny models built from real architectures that nobody in this project wrote.

Hugging Face ``transformers`` models (built from config classes, nothing downloaded),
PyTorch's own recurrent/transformer layers and parametrizations, hand-written modules
that mimic the tied-weight and position patterns of real models (each names the model
it mimics), PEFT LoRA, and BackPACK's first-order test problems. Every entry is tiny,
deterministic under ``torch.manual_seed`` and float32, with every dropout set to 0.

Sizes: batch size N, sequence length T and hidden size D differ in every entry (N in
{3, 4}, T in 5..7, D in 8..32), except ``seq_first_linear_square`` that sets T == N on
purpose. The ``oracle`` field says which exact oracle of ``truegrad.testing`` applies:
"func" (torch.func) wherever it runs, "loop" where torch.func cannot run the model.

Each Hugging Face entry sets its attention implementation ("eager" or "sdpa") in the
config (``attn_implementation=...``) and says which in its comment. Both run under
torch.func, except that a padding ``attention_mask`` makes the mask builder of BERT
(either) and of causal models with "sdpa" ask whether the mask is all ones: data-dependent
control flow, so those entries use "loop". The one entry with ``samples_interact=True``
(HF ResNet in training mode) takes its per-sample oracle after ``model.eval()``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zoo import ZooEntry

__all__ = ["REAL_ZOO"]


# ============================================================================ losses


def _logits(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def _lm(out: Any, target: torch.Tensor) -> torch.Tensor:
    """Token cross-entropy of (N, T, V) logits (padding targets are -100, ignored)."""
    logits = _logits(out)
    return F.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=-100)


def _ce(out: Any, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_logits(out), target)


def _ce_sum(out: Any, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_logits(out), target, reduction="sum")


def _mse(out: Any, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target)


def _hidden(out: Any, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.last_hidden_state, target)


def _pooled(out: Any, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.pooler_output, target)


def _clip(out: Any, targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    # per-sample losses on each tower; logits_per_image would mix the samples of a batch
    text, image = targets
    return F.mse_loss(out["text_embeds"], text) + F.mse_loss(out["image_embeds"], image)


def _ids(n: int, t: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t))


def _right_padding_mask(n: int, t: int, lengths: list[int]) -> torch.Tensor:
    mask = torch.ones(n, t, dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, length:] = 0
    return mask


def _masked_targets(n: int, t: int, vocab: int, lengths: list[int]) -> torch.Tensor:
    target = torch.randint(0, vocab, (n, t))
    for i, length in enumerate(lengths):
        target[i, length:] = -100
    return target


# ============================================================ Hugging Face transformers

_BERT_LENGTHS = [6, 4, 5]  # N=3, T=6: rows 1 and 2 padded on the right


def _bert_config(**extra: Any):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=12, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, **extra,
    )


def hf_bert() -> nn.Module:
    from transformers import BertModel

    return BertModel(_bert_config(attn_implementation="eager"))


def hf_bert_mlm() -> nn.Module:
    from transformers import BertForMaskedLM

    return BertForMaskedLM(_bert_config(attn_implementation="sdpa"))


def hf_roberta() -> nn.Module:
    from transformers import RobertaConfig, RobertaModel

    # position ids are made from input_ids (cumsum of non-pad tokens, offset by pad_token_id + 1)
    config = RobertaConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=12, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=1, attn_implementation="sdpa",
    )
    return RobertaModel(config, add_pooling_layer=False)


def hf_distilbert() -> nn.Module:
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(
        vocab_size=30, max_position_embeddings=12, n_layers=2, n_heads=2, dim=16,
        hidden_dim=32, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0,
        qa_dropout=0.0, attn_implementation="eager",
    )
    return DistilBertModel(config)


def hf_albert() -> nn.Module:
    from transformers import AlbertConfig, AlbertModel

    config = AlbertConfig(
        vocab_size=30, embedding_size=8, hidden_size=16, num_hidden_layers=2,
        num_hidden_groups=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        classifier_dropout_prob=0.0, attn_implementation="eager",
    )
    return AlbertModel(config, add_pooling_layer=False)


def hf_deberta_v2() -> nn.Module:
    from transformers import DebertaV2Config, DebertaV2Model

    config = DebertaV2Config(
        vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=12, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, relative_attention=True, pos_att_type=["p2c", "c2p"],
        position_buckets=4, max_relative_positions=12, norm_rel_ebd="layer_norm",
        share_att_key=True, position_biased_input=False, type_vocab_size=0,
    )
    return DebertaV2Model(config)


def _gpt2_config(**extra: Any):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=30, n_positions=12, n_embd=16, n_layer=2, n_head=2, n_inner=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
        bos_token_id=0, eos_token_id=0, use_cache=False, **extra,
    )


def hf_gpt2() -> nn.Module:
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel(_gpt2_config(attn_implementation="eager"))


def hf_gpt2_sdpa() -> nn.Module:
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel(_gpt2_config(attn_implementation="sdpa"))


class GPT2WithPositionIds(nn.Module):
    """GPT2LMHeadModel called with explicit position_ids of shape (1, T)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = hf_gpt2_sdpa()

    def forward(self, input_ids: torch.Tensor) -> Any:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        return self.model(input_ids=input_ids, position_ids=position_ids)


def hf_gpt_neox() -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=12, rotary_pct=0.5,
        use_parallel_residual=True, hidden_dropout=0.0, attention_dropout=0.0,
        classifier_dropout=0.0, use_cache=False, attn_implementation="eager",
    )
    return GPTNeoXForCausalLM(config)


def _llama_config(**extra: Any):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=12,
        attention_dropout=0.0, use_cache=False, pad_token_id=0, **extra,
    )


def hf_llama() -> nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(_llama_config(attn_implementation="eager"))


def hf_llama_sdpa() -> nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(_llama_config(attn_implementation="sdpa"))


def hf_mistral() -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=12,
        sliding_window=4, attention_dropout=0.0, use_cache=False, attn_implementation="eager",
    )
    return MistralForCausalLM(config)


def hf_qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=12,
        attention_dropout=0.0, use_cache=False, attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(config)


def hf_phi() -> nn.Module:
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(
        vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=12, partial_rotary_factor=0.5,
        resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, use_cache=False,
        attn_implementation="eager",
    )
    return PhiForCausalLM(config)


def hf_gemma() -> nn.Module:
    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(
        vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=12,
        attention_dropout=0.0, use_cache=False, attn_implementation="eager",
    )
    return GemmaForCausalLM(config)


def hf_t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=30, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
        num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=12,
        dropout_rate=0.0, feed_forward_proj="relu", decoder_start_token_id=0, use_cache=False,
        attn_implementation="eager",
    )
    return T5ForConditionalGeneration(config)


def hf_bart() -> nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=30, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=12, scale_embedding=True, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, classifier_dropout=0.0, use_cache=False,
        attn_implementation="eager",
    )
    return BartForConditionalGeneration(config)


def hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=5, attn_implementation="eager",
    )
    return ViTForImageClassification(config)


def hf_convnext() -> nn.Module:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(
        num_channels=3, patch_size=2, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
        drop_path_rate=0.0, layer_scale_init_value=0.5, image_size=12, num_labels=5,
    )
    return ConvNextForImageClassification(config)


def _hf_resnet():
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
        layer_type="basic", hidden_act="relu", downsample_in_first_stage=False,
    )
    return ResNetModel(config)


def hf_resnet_train() -> nn.Module:
    return _hf_resnet().train()


def hf_resnet_eval() -> nn.Module:
    model = _hf_resnet().train()
    with torch.no_grad():  # non-trivial running statistics
        model(torch.randn(8, 3, 20, 20))
    return model.eval()


def _wav2vec2(norm: str) -> nn.Module:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8), conv_stride=(2, 2), conv_kernel=(4, 3), conv_bias=norm == "layer",
        feat_extract_norm=norm, num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
        do_stable_layer_norm=norm == "layer", mask_time_prob=0.0, mask_feature_prob=0.0,
        hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0,
        feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0, vocab_size=30,
        attn_implementation="eager",
    )
    return Wav2Vec2Model(config)


def hf_wav2vec2_group() -> nn.Module:
    return _wav2vec2("group")


def hf_wav2vec2_layer() -> nn.Module:
    return _wav2vec2("layer")


def hf_whisper() -> nn.Module:
    from transformers import WhisperConfig, WhisperModel

    config = WhisperConfig(
        vocab_size=30, num_mel_bins=8, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_source_positions=6, max_target_positions=12, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, mask_time_prob=0.0, mask_feature_prob=0.0,
        use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        begin_suppress_tokens=None, suppress_tokens=None, attn_implementation="eager",
    )
    return WhisperModel(config)


def hf_clip() -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(
            vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=12, attention_dropout=0.0,
            bos_token_id=1, eos_token_id=29, pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_channels=3, image_size=8, patch_size=4, attention_dropout=0.0,
        ),
        projection_dim=12, attn_implementation="eager",
    )
    return CLIPModel(config)


class CLIPEmbeds(nn.Module):
    """CLIPModel's forward, returning only its per-sample outputs: logits_per_image and
    logits_per_text are (N, N) and mix the samples, so no per-sample oracle could take
    them as outputs (even unused by the loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.clip = hf_clip()

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> dict[str, Any]:
        out = self.clip(input_ids=input_ids, pixel_values=pixel_values)
        return {"text_embeds": out.text_embeds, "image_embeds": out.image_embeds}


def _clip_inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 29, (4, 6))
    ids[:, -1] = 29  # eos: the text tower pools at the first eos token
    return {"input_ids": ids, "pixel_values": torch.randn(4, 3, 8, 8)}


# ===================================================================== PyTorch layers


class RecurrentNet(nn.Module):
    """(N, T, D) -> recurrent layer -> Linear head; transposes for batch_first=False."""

    def __init__(self, cls: type[nn.RNNBase], in_dim: int = 8, hidden: int = 12, out: int = 5,
                 *, batch_first: bool = True, **kwargs: Any) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cls(in_dim, hidden, batch_first=batch_first, **kwargs)
        width = kwargs.get("proj_size", 0) or hidden
        width *= 2 if kwargs.get("bidirectional", False) else 1
        self.head = nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        y, _ = self.rnn(x)
        if not self.batch_first:
            y = y.transpose(0, 1)
        return self.head(y)


class PackedLSTM(nn.Module):
    """LSTM over a padded batch packed with pack_padded_sequence (unsorted lengths)."""

    def __init__(self, in_dim: int = 8, hidden: int = 12, out: int = 5) -> None:
        super().__init__()
        self.rnn = nn.LSTM(in_dim, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, out)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(
            x, lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        y, _ = self.rnn(packed)
        y, _ = nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=x.shape[1])
        return self.head(y)


class LSTMLanguageModel(nn.Module):
    """Embedding -> 2-layer LSTM -> Linear (the PyTorch word_language_model example)."""

    def __init__(self, vocab: int = 30, dim: int = 12, hidden: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, hidden, num_layers=2, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(self.embed(ids))
        return self.decoder(y)


class SeqFirstTransformer(nn.Module):
    """nn.Transformer (encoder-decoder, batch_first=False) with a causal target mask."""

    def __init__(self, dim: int = 16, out: int = 5) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0)
        encoder = nn.TransformerEncoder(layer, 1, nn.LayerNorm(dim), enable_nested_tensor=False)
        self.transformer = nn.Transformer(
            dim, 2, num_decoder_layers=1, dim_feedforward=32, dropout=0.0, custom_encoder=encoder
        )
        self.head = nn.Linear(dim, out)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        t = tgt.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        y = self.transformer(
            src.transpose(0, 1), tgt.transpose(0, 1), tgt_mask=mask, tgt_is_causal=True
        )
        return self.head(y.transpose(0, 1))


class SeqFirstEncoder(nn.Module):
    """nn.TransformerEncoder (batch_first=False, gelu, norm_first) on (N, T, D) input."""

    def __init__(self, dim: int = 16, out: int = 5) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            dim, 2, 32, dropout=0.0, activation="gelu", norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x.transpose(0, 1)).transpose(0, 1))


def weight_norm_linear() -> nn.Module:
    from torch.nn.utils.parametrizations import weight_norm

    return nn.Sequential(weight_norm(nn.Linear(12, 16)), nn.Tanh(), nn.Linear(16, 5))


def weight_norm_conv1d() -> nn.Module:
    from torch.nn.utils.parametrizations import weight_norm

    return nn.Sequential(
        weight_norm(nn.Conv1d(6, 8, 3, padding=1), dim=0), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 7, 5),
    )


def spectral_norm_linear() -> nn.Module:
    from torch.nn.utils.parametrizations import spectral_norm

    model = nn.Sequential(spectral_norm(nn.Linear(12, 16)), nn.Tanh(), nn.Linear(16, 5))
    # in training mode every forward runs a power iteration that updates the buffers u, v
    # in place; eval mode keeps them fixed so that repeated forwards agree
    return model.eval()


class Symmetric(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.triu() + x.triu(1).T


def symmetric_linear() -> nn.Module:
    from torch.nn.utils import parametrize

    lin = nn.Linear(16, 16)
    parametrize.register_parametrization(lin, "weight", Symmetric())
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), lin, nn.Tanh(), nn.Linear(16, 5))


# ======================================================== tied weights and positions


class ScaledEmbedding(nn.Embedding):
    """Gemma's / Bart's scaled word embedding (BartScaledWordEmbedding): output * scale."""

    def __init__(self, num: int, dim: int, scale: float) -> None:
        super().__init__(num, dim)
        self.scale = scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.scale


class ScaledEmbeddingTiedLM(nn.Module):
    """Mimics Bart/Gemma: scaled embedding subclass tied to an nn.Linear LM head."""

    def __init__(self, vocab: int = 30, dim: int = 16) -> None:
        super().__init__()
        self.embed = ScaledEmbedding(vocab, dim, math.sqrt(dim))
        self.mix = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.mix(self.embed(ids))))


class MatmulTiedLM(nn.Module):
    """Mimics OpenAI's original GPT-2 (model.py: logits = matmul(h, wte, transpose_b=True))."""

    def __init__(self, vocab: int = 30, dim: int = 16) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.wte(ids)))
        return h @ self.wte.weight.T


class FLinearTiedLM(nn.Module):
    """Mimics fairseq's TransformerDecoder.output_layer: F.linear(h, embed_tokens.weight)."""

    def __init__(self, vocab: int = 30, dim: int = 16) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.embed_tokens(ids)))
        return F.linear(h, self.embed_tokens.weight)


class PositionEmbeddingLM(nn.Module):
    """Token + learned position embeddings: nanoGPT's torch.arange(T) (1-D), or GPT-2/BERT's
    (1, T) position ids."""

    def __init__(
        self, vocab: int = 30, dim: int = 16, context: int = 12, two_d: bool = False
    ) -> None:
        super().__init__()
        self.two_d = two_d
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        if self.two_d:
            positions = positions[None]
        return self.head(torch.tanh(self.wte(ids) + self.wpe(positions)))


class WeightOnlyTable(nn.Module):
    """Mimics DeBERTa's rel_embeddings: a module whose .weight is read, never called."""

    def __init__(self, dim: int = 16, rows: int = 24, out: int = 5) -> None:
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(12, dim)
        self.table = nn.Embedding(rows, dim)
        self.head = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(x))
        h = h @ self.table.weight[: self.dim].T
        return self.head(h)


class ClassTokenNet(nn.Module):
    """Mimics ViT's class token (torch.cat of an expanded parameter onto the batch), and with
    registers=True Dinov2WithRegisters' two register tokens (stacked, then concatenated)."""

    def __init__(self, dim: int = 16, out: int = 5, registers: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.registers = registers
        if registers:
            self.reg0 = nn.Parameter(torch.randn(dim))
            self.reg1 = nn.Parameter(torch.randn(dim))
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = self.embed(x)
        tokens = [self.cls.expand(n, -1, -1)]
        if self.registers:
            tokens.append(torch.stack([self.reg0, self.reg1])[None].expand(n, -1, -1))
        h = torch.cat([*tokens, h], dim=1)
        h = h + torch.softmax(h @ h.transpose(1, 2), dim=-1) @ self.mix(h)
        return self.head(h[:, 0])


class RelativePositionBiasAttention(nn.Module):
    """Mimics T5/Swin: a (2T-1, H) relative position bias table indexed with constant
    indices (a buffer, as Swin's relative_position_index) and added to attention scores."""

    def __init__(self, dim: int = 16, heads: int = 2, t: int = 6, out: int = 5) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.bias_table = nn.Parameter(torch.randn(2 * t - 1, heads))
        pos = torch.arange(t)
        self.register_buffer("index", pos[:, None] - pos[None, :] + t - 1, persistent=False)
        self.head = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        scores = scores + self.bias_table[self.index].permute(2, 0, 1)[None]
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, t, d)
        return self.head(y)


class LlamaStyleRMSNorm(nn.Module):
    """Llama's LlamaRMSNorm, written with elementwise ops."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x


def rmsnorm_net() -> nn.Module:
    norm = LlamaStyleRMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return nn.Sequential(nn.Linear(12, 16), norm, nn.SiLU(), nn.Linear(16, 5))


class GPT2Conv1D(nn.Module):
    """GPT-2's Conv1D (transformers.pytorch_utils.Conv1D): weight (nx, nf), torch.addmm."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


def gpt2_conv1d_mlp() -> nn.Module:
    return nn.Sequential(GPT2Conv1D(32, 12), nn.GELU(), GPT2Conv1D(5, 32))


class FlattenedLinear(nn.Module):
    """A Linear applied to a flattened (N*T, D) operand and reshaped back (as GPT-2 Conv1D
    callers and many HF heads do)."""

    def __init__(self, dim: int = 12, hidden: int = 16, out: int = 5) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, hidden)
        self.head = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = self.lin(x.reshape(-1, d)).reshape(n, t, -1)
        return self.head(torch.tanh(h))


class SeqFirstLinear(nn.Module):
    """fairseq/nn.Transformer style: transpose (N, T, D) to (T, N, D), apply Linear and
    LayerNorm there, transpose back."""

    def __init__(self, dim: int = 12, hidden: int = 16, out: int = 5) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.lin(x.transpose(0, 1))))
        return self.head(h.transpose(0, 1))


# ========================================================================= PEFT LoRA


def peft_lora_llama() -> nn.Module:
    import peft
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(_llama_config(attn_implementation="eager"))
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0
    )
    return peft.get_peft_model(model, config)


def peft_lora_gpt2() -> nn.Module:
    import peft
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(_gpt2_config(attn_implementation="eager"))
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_dropout=0.0, fan_in_fan_out=True
    )
    model = peft.get_peft_model(model, config)
    # LoRA B starts at zero, so A would get a zero gradient: perturb B to exercise both
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    return model


# ================================================== BackPACK first-order test problems
# f-dangel/backpack test/extensions/firstorder/firstorder_settings.py and
# test/extensions/automated_settings.py (make_simple_cnn_setting: conv -> ReLU -> Flatten
# -> Linear(., 5); newer BackPACK freezes that Linear). Batch sizes are BackPACK's 3 where
# that does not equal a channel/feature size, else 4.


def _simple_cnn(conv: nn.Module, in_shape: tuple[int, ...]) -> nn.Module:
    with torch.no_grad():
        features = conv(torch.zeros(1, *in_shape)).numel()
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(features, 5))


def _backpack_cnn(cls: type[nn.Module], in_shape: tuple[int, ...], *params: Any) -> Any:
    return lambda: _simple_cnn(cls(*params), in_shape)


# ===================================================================== the zoo


def _lm_entry(name: str, build: Any, n: int, t: int, **kwargs: Any) -> ZooEntry:
    """A language model on input_ids (N, T) (keyword, or positional with ``kw=False``),
    token cross-entropy against random targets."""
    keyword = kwargs.pop("kw", True)
    inputs = (lambda: {"input_ids": _ids(n, t, 30)}) if keyword else (lambda: _ids(n, t, 30))
    return ZooEntry(name, build, inputs, _lm, lambda: _ids(n, t, 30), **kwargs)


def _padded_lm_entry(name: str, build: Any, lengths: list[int], t: int, **kwargs: Any) -> ZooEntry:
    """input_ids with a right-padding attention_mask; padded targets are ignored (-100)."""
    n = len(lengths)
    return ZooEntry(
        name, build,
        lambda: {"input_ids": _ids(n, t, 30), "attention_mask": _right_padding_mask(n, t, lengths)},
        _lm, lambda: _masked_targets(n, t, 30, lengths), **kwargs,
    )


def _hidden_entry(name: str, build: Any, inputs: Any, out_shape: tuple[int, ...], **kw: Any):
    """MSE of last_hidden_state against a random target."""
    return ZooEntry(name, build, inputs, _hidden, lambda: torch.randn(out_shape), **kw)


def _seq_entry(name: str, build: Any, n: int, t: int, d: int, out: int = 5, **kw: Any):
    """(N, T, D) input, MSE of (N, T, out) output against a random target."""
    return ZooEntry(
        name, build, lambda: torch.randn(n, t, d), _mse, lambda: torch.randn(n, t, out), **kw
    )


def _cls_entry(name: str, build: Any, shape: tuple[int, ...], classes: int = 5,
               loss: Any = _ce, rand: Any = torch.randn, **kw: Any) -> ZooEntry:
    """An input of ``shape``, cross-entropy against random classes."""
    return ZooEntry(
        name, build, lambda: rand(shape), loss, lambda: torch.randint(0, classes, shape[:1]), **kw
    )


def _pixels(*shape: int):
    return lambda: {"pixel_values": torch.randn(shape)}


REAL_ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        # ---------------------------------------------------------------- Hugging Face
        # BERT (eager): attention_mask with right padding, absolute position ids from the
        # registered (1, max) buffer; the pooler is unused. "loop": the mask builder asks
        # padding_mask.all() (data-dependent control flow torch.func cannot run)
        _hidden_entry(
            "hf_bert", hf_bert,
            lambda: {
                "input_ids": _ids(3, 6, 30),
                "attention_mask": _right_padding_mask(3, 6, _BERT_LENGTHS),
            },
            (3, 6, 16), oracle="loop",
        ),
        # BERT MLM (sdpa, no attention_mask): decoder weight tied to the word embeddings
        _lm_entry("hf_bert_mlm", hf_bert_mlm, 4, 6),
        # RoBERTa (sdpa): position ids computed from input_ids (padding_idx offset)
        _hidden_entry(
            "hf_roberta", hf_roberta, lambda: {"input_ids": torch.randint(2, 30, (4, 7))},
            (4, 7, 16),
        ),
        # DistilBERT (eager): no token types, position ids from a buffer
        _hidden_entry(
            "hf_distilbert", hf_distilbert, lambda: {"input_ids": _ids(3, 7, 30)}, (3, 7, 16)
        ),
        # ALBERT (eager): factorised embedding (8 -> 16) and one layer shared by both layers
        _hidden_entry("hf_albert", hf_albert, lambda: {"input_ids": _ids(4, 6, 30)}, (4, 6, 16)),
        # DeBERTa-v2 (its own attention code): disentangled relative attention (p2c, c2p),
        # position_buckets=4, shared keys, rel_embeddings.weight read without calling the
        # module, padding attention_mask (without one, a pad-token check runs `in` on data)
        _hidden_entry(
            "hf_deberta_v2", hf_deberta_v2,
            lambda: {
                "input_ids": _ids(3, 7, 30), "attention_mask": _right_padding_mask(3, 7, [7, 5, 6])
            },
            (3, 7, 16),
        ),
        # GPT-2 LM head (eager): Conv1D (addmm) layers, lm_head tied to wte, default positions
        _lm_entry("hf_gpt2", hf_gpt2, 3, 7),
        # GPT-2 (sdpa) given position_ids=torch.arange(T)[None] of shape (1, T), broadcast
        # over the batch (passed by a wrapper: every input of an entry is batched on dim 0)
        _lm_entry("hf_gpt2_position_ids", GPT2WithPositionIds, 3, 7, kw=False),
        # GPT-NeoX (eager): fused qkv, partial rotary embedding, parallel residual, untied embed_out
        _lm_entry("hf_gpt_neox", hf_gpt_neox, 4, 6),
        # Llama (eager): RMSNorm, rotary, grouped-query attention, padding attention_mask
        _padded_lm_entry("hf_llama", hf_llama, [6, 4, 5], 6),
        # Llama (sdpa) with a padding attention_mask. "loop": the sdpa mask builder asks
        # whether the padding mask is all ones (data-dependent control flow)
        _padded_lm_entry("hf_llama_sdpa", hf_llama_sdpa, [7, 5, 6, 7], 7, oracle="loop"),
        # Mistral (eager): sliding-window attention (window 4 < T = 7)
        _lm_entry("hf_mistral", hf_mistral, 3, 7),
        # Qwen2 (sdpa): q/k/v projections with bias
        _lm_entry("hf_qwen2", hf_qwen2, 3, 6),
        # Phi (eager): partial rotary, LayerNorm, parallel attention/MLP, lm_head with bias
        _lm_entry("hf_phi", hf_phi, 4, 6),
        # Gemma (eager): GemmaTextScaledWordEmbedding (an nn.Embedding subclass scaling by
        # sqrt(hidden) in its own forward) tied to lm_head, RMSNorm with (1 + weight)
        _lm_entry("hf_gemma", hf_gemma, 3, 7),
        # T5 (eager): relative attention bias (bucketed), shared tied embeddings used by
        # encoder, decoder and (rescaled) lm_head; explicit decoder_input_ids (T_dec = 5)
        ZooEntry(
            "hf_t5", hf_t5,
            lambda: {"input_ids": _ids(3, 7, 30), "decoder_input_ids": _ids(3, 5, 30)},
            _lm, lambda: _ids(3, 5, 30),
        ),
        # Bart (eager): scaled word embeddings shared by encoder/decoder and tied lm_head,
        # learned positions with offset 2, decoder_input_ids made by shifting input_ids
        ZooEntry(
            "hf_bart", hf_bart, lambda: {"input_ids": torch.randint(3, 30, (4, 6))}, _lm,
            lambda: _ids(4, 6, 30),
        ),
        # ViT (eager): class token concatenated onto the batch, position embeddings parameter
        ZooEntry("hf_vit", hf_vit, _pixels(4, 3, 8, 8), _ce, lambda: torch.randint(0, 5, (4,))),
        # ConvNeXt: depthwise conv, channels-first/last LayerNorm, layer-scale parameters
        ZooEntry(
            "hf_convnext", hf_convnext, _pixels(4, 3, 12, 12), _ce,
            lambda: torch.randint(0, 5, (4,)),
        ),
        # HF ResNet in training mode: BatchNorm with batch statistics (samples interact)
        ZooEntry(
            "hf_resnet_train", hf_resnet_train, _pixels(4, 3, 20, 20), _pooled,
            lambda: torch.randn(4, 16, 1, 1), samples_interact=True,
        ),
        # HF ResNet in eval mode: BatchNorm on (warmed-up) running statistics
        ZooEntry(
            "hf_resnet_eval", hf_resnet_eval, _pixels(4, 3, 20, 20), _pooled,
            lambda: torch.randn(4, 16, 1, 1),
        ),
        # Wav2Vec2 (eager): conv feature extractor with GroupNorm on the first layer,
        # weight_norm positional conv (dim=2, groups=2, same-pad); mask_time_prob=0
        _hidden_entry(
            "hf_wav2vec2_group", hf_wav2vec2_group, lambda: {"input_values": torch.randn(3, 30)},
            (3, 6, 16),
        ),
        # Wav2Vec2 (eager): LayerNorm feature extractor with conv bias, stable (pre-norm) layers
        _hidden_entry(
            "hf_wav2vec2_layer", hf_wav2vec2_layer, lambda: {"input_values": torch.randn(3, 30)},
            (3, 6, 16),
        ),
        # Whisper (eager): conv encoder on input_features (frozen sinusoidal positions),
        # decoder with learned positions and cross-attention, explicit decoder_input_ids
        _hidden_entry(
            "hf_whisper", hf_whisper,
            lambda: {"input_features": torch.randn(3, 8, 12), "decoder_input_ids": _ids(3, 5, 30)},
            (3, 5, 16),
        ),
        # CLIP (eager): CLIPModel.forward on input_ids + pixel_values, text tower (causal
        # mask, pooled at the first eos) and vision tower (class token); a wrapper returns
        # only text_embeds/image_embeds (logits_per_image mixes samples); logit_scale unused
        ZooEntry(
            "hf_clip", CLIPEmbeds, _clip_inputs, _clip,
            lambda: (torch.randn(4, 12), torch.randn(4, 12)),
        ),
        # ------------------------------------------------------------ PyTorch layers
        # LSTM, batch_first=True
        _seq_entry("lstm", lambda: RecurrentNet(nn.LSTM), 3, 6, 8),
        # LSTM, batch_first=False (the wrapper transposes), 2 layers, bidirectional
        _seq_entry(
            "lstm_seq_first_bidir_2layer",
            lambda: RecurrentNet(nn.LSTM, batch_first=False, num_layers=2, bidirectional=True),
            3, 6, 8,
        ),
        # LSTM with proj_size (weight_hr), bidirectional. "loop" here and for every GRU/RNN
        # entry: torch.func's fallback for these RNN ops fails writing into the unbatched
        # initial hidden state (only the plain oneDNN LSTM runs under vmap)
        _seq_entry(
            "lstm_proj", lambda: RecurrentNet(nn.LSTM, proj_size=6, bidirectional=True), 4, 7, 8,
            oracle="loop",
        ),
        # LSTM without biases, batch_first=False
        _seq_entry(
            "lstm_nobias_seq_first",
            lambda: RecurrentNet(nn.LSTM, batch_first=False, bias=False), 4, 6, 8,
        ),
        # GRU, batch_first=True, 2 layers
        _seq_entry(
            "gru_2layer", lambda: RecurrentNet(nn.GRU, num_layers=2), 3, 7, 8, oracle="loop"
        ),
        # GRU, batch_first=False, bidirectional, no bias
        _seq_entry(
            "gru_seq_first_bidir_nobias",
            lambda: RecurrentNet(nn.GRU, batch_first=False, bidirectional=True, bias=False),
            4, 6, 8, oracle="loop",
        ),
        # Elman RNN (tanh), batch_first=True, 2 layers, bidirectional
        _seq_entry(
            "rnn_tanh_bidir_2layer",
            lambda: RecurrentNet(nn.RNN, num_layers=2, bidirectional=True), 3, 6, 8, oracle="loop",
        ),
        # Elman RNN (relu), batch_first=False
        _seq_entry("rnn_relu_seq_first",
                   lambda: RecurrentNet(nn.RNN, batch_first=False, nonlinearity="relu"), 4, 7, 8,
                   oracle="loop"),
        # Elman RNN (relu), no bias
        _seq_entry("rnn_relu_nobias", lambda: RecurrentNet(nn.RNN, nonlinearity="relu", bias=False),
                   3, 5, 8, oracle="loop"),
        # bidirectional LSTM over a PackedSequence (unsorted lengths, enforce_sorted=False);
        # "loop": packing is data-dependent (per-sample lengths), vmap cannot batch it
        ZooEntry(
            "lstm_packed", PackedLSTM,
            lambda: (torch.randn(4, 6, 8), torch.tensor([6, 3, 5, 2])), _mse,
            lambda: torch.randn(4, 6, 5), oracle="loop",
        ),
        # LSTM language model: Embedding -> LSTM -> Linear
        _lm_entry("lstm_lm", LSTMLanguageModel, 3, 7, kw=False),
        # nn.Transformer encoder-decoder, batch_first=False, causal target mask
        ZooEntry(
            "torch_transformer", SeqFirstTransformer,
            lambda: (torch.randn(3, 7, 16), torch.randn(3, 5, 16)), _mse,
            lambda: torch.randn(3, 5, 5),
        ),
        # nn.TransformerEncoder, batch_first=False, norm_first, gelu
        _seq_entry("torch_transformer_encoder", SeqFirstEncoder, 4, 6, 16),
        # parametrizations.weight_norm on a Linear (original0 = g, original1 = v)
        _cls_entry("weight_norm_linear", weight_norm_linear, (3, 12)),
        # parametrizations.weight_norm on a Conv1d
        _cls_entry("weight_norm_conv1d", weight_norm_conv1d, (4, 6, 7)),
        # parametrizations.spectral_norm on a Linear (eval mode: no power-iteration updates)
        _cls_entry("spectral_norm_linear", spectral_norm_linear, (3, 12)),
        # custom register_parametrization: symmetric weight X.triu() + X.triu(1).T
        _cls_entry("symmetric_parametrization", symmetric_linear, (4, 12)),
        # ------------------------------------------------- tied weights and positions
        # (a) ScaledEmbedding subclass (own forward, * sqrt(D)) tied to an nn.Linear head
        _lm_entry("tied_scaled_embedding", ScaledEmbeddingTiedLM, 3, 6, kw=False),
        # (b) tied weight reused as h @ emb.weight.T
        _lm_entry("tied_matmul_transpose", MatmulTiedLM, 3, 6, kw=False),
        # (c) tied weight reused as F.linear(h, emb.weight)
        _lm_entry("tied_f_linear", FLinearTiedLM, 4, 7, kw=False),
        # (d) position embedding indexed by torch.arange(T) (1-D)
        _lm_entry("position_arange_1d", PositionEmbeddingLM, 3, 7, kw=False),
        # (d) position embedding indexed by torch.arange(T)[None] (shape (1, T))
        _lm_entry("position_arange_2d", lambda: PositionEmbeddingLM(two_d=True), 4, 6, kw=False),
        # (e) nn.Embedding whose .weight is sliced and matmul'd, the module never called
        _seq_entry("weight_only_table", WeightOnlyTable, 3, 7, 12),
        # (f) ViT class token: torch.cat of cls.expand(N, -1, -1) with the patch tokens
        _cls_entry("class_token", ClassTokenNet, (4, 6, 8)),
        # (f) class token plus two register tokens built with torch.stack, then torch.cat
        _cls_entry("register_tokens", lambda: ClassTokenNet(registers=True), (3, 5, 8)),
        # (g) (2T-1, H) relative position bias table, constant index buffer, added to scores
        _seq_entry("relative_position_bias", RelativePositionBiasAttention, 4, 6, 16),
        # (h) Llama-style RMSNorm written with elementwise ops
        _seq_entry("llama_rmsnorm", rmsnorm_net, 3, 7, 12),
        # (i) GPT-2 Conv1D: torch.addmm(bias, x.view(-1, nx), weight).view(..., nf)
        _seq_entry("gpt2_conv1d", gpt2_conv1d_mlp, 4, 6, 12),
        # (j) Linear on a flattened (N*T, D) operand, reshaped back to (N, T, .)
        _seq_entry("flattened_linear", FlattenedLinear, 3, 7, 12),
        # (k) sequence-first Linear + LayerNorm on (T, N, D)
        _seq_entry("seq_first_linear", SeqFirstLinear, 3, 6, 12),
        # (k) the same with T == N == 4 on purpose: the batch cannot be guessed from sizes
        _seq_entry("seq_first_linear_square", SeqFirstLinear, 4, 4, 12),
        # ------------------------------------------------------------------ PEFT LoRA
        # LoRA (r=4) on q_proj/v_proj of a tiny Llama; only the LoRA A/B matrices train.
        # As PEFT initialises it: lora_B == 0, so every lora_A gets an exactly zero gradient
        _lm_entry("peft_lora_llama", peft_lora_llama, 3, 6),
        # LoRA on GPT-2's Conv1D layers (fan_in_fan_out=True), lora_B perturbed from zero
        _lm_entry("peft_lora_gpt2", peft_lora_gpt2, 4, 7),
        # ------------------------------------------------------------------- BackPACK
        # Linear-Linear, cross-entropy "mean"
        _cls_entry("backpack_linear_mean", lambda: nn.Sequential(nn.Linear(10, 7), nn.Linear(7, 5)),
                   (3, 10), rand=torch.rand),
        # Linear-ReLU-Linear, cross-entropy "sum"
        _cls_entry("backpack_linear_relu_sum",
                   lambda: nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 5)),
                   (3, 10), loss=_ce_sum, rand=torch.rand),
        # Linear-Sigmoid-Linear regression, MSE "mean"
        ZooEntry(
            "backpack_linear_sigmoid_mse",
            lambda: nn.Sequential(nn.Linear(10, 7), nn.Sigmoid(), nn.Linear(7, 5)),
            lambda: torch.rand(3, 10), _mse, lambda: torch.rand(3, 5),
        ),
        # Linear on three additional dims, ReLU, Flatten, cross-entropy "sum" (BackPACK's
        # "three-additional" problem with sizes changed so that no two dims are equal)
        _cls_entry("backpack_linear_3extra_flatten_sum",
                   lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2), nn.Flatten()),
                   (3, 4, 2, 5, 6), classes=80, loss=_ce_sum, rand=torch.rand),
        # Conv1d with stride and dilation
        _cls_entry("backpack_conv1d_dilation", _backpack_cnn(nn.Conv1d, (2, 7), 2, 3, 2, 2, 0, 2),
                   (4, 2, 7), rand=torch.rand),
        # Conv2d with stride, padding, dilation
        _cls_entry("backpack_conv2d_stride_pad_dilation",
                   _backpack_cnn(nn.Conv2d, (3, 8, 8), 3, 6, 2, 4, 2, 3), (4, 3, 8, 8),
                   rand=torch.rand),
        # Conv3d with stride and padding, cross-entropy "sum"
        _cls_entry("backpack_conv3d", _backpack_cnn(nn.Conv3d, (3, 2, 7, 7), 3, 2, 2, 3, 2),
                   (4, 3, 2, 7, 7), loss=_ce_sum, rand=torch.rand),
        # ConvTranspose1d with stride and dilation
        _cls_entry("backpack_convtranspose1d_dilation",
                   _backpack_cnn(nn.ConvTranspose1d, (2, 7), 2, 3, 2, 2, 0, 0, 1, True, 2),
                   (4, 2, 7), rand=torch.rand),
        # ConvTranspose2d with stride and padding, no bias
        _cls_entry("backpack_convtranspose2d_nobias",
                   _backpack_cnn(nn.ConvTranspose2d, (3, 7, 7), 3, 2, 2, 4, 2, 0, 1, False),
                   (4, 3, 7, 7), rand=torch.rand),
        # ConvTranspose3d with stride, padding, dilation
        _cls_entry("backpack_convtranspose3d",
                   _backpack_cnn(nn.ConvTranspose3d, (2, 3, 5, 5), 2, 3, 2, 2, 2, 0, 1, True, 2),
                   (4, 2, 3, 5, 5), rand=torch.rand),
        # newer BackPACK: Conv2d -> Sigmoid -> Flatten -> frozen Linear (requires_grad=False)
        _cls_entry("backpack_conv2d_sigmoid_frozen_head",
                   lambda: nn.Sequential(nn.Conv2d(3, 2, 2), nn.Sigmoid(), nn.Flatten(),
                                         nn.Linear(72, 5).requires_grad_(False)),
                   (4, 3, 7, 7), rand=torch.rand),
    ]
}
