"""Cost of the exact statistic on real architectures: Hugging Face GPT-2, Llama, BERT, ViT
and an LSTM language model, one training step (forward + backward, gradients and statistics
cleared as ``zero_grad`` does) per contender, versus plain torch.

Timing as in ``backward_overhead.py``: paired and alternating in one process, the order
rotated from round to round, each contender's step time divided by plain's of the same round,
the median over rounds reported; peak memory is the peak of torch's CPU allocations during
one step above plain's (``torch.profiler``). glibc keeps freed memory by default (see
``backward_overhead.py``).

Models (random weights from configs, nothing downloaded), batch 4:

* ``gpt2``: ``GPT2LMHeadModel``, hidden 512, 4 layers, 8 heads, vocabulary 8192, T=256;
* ``llama``: ``LlamaForCausalLM``, hidden 512, 4 layers, 8 heads (4 key/value), MLP 1376,
  vocabulary 8192, T=256;
* ``bert``: ``BertForMaskedLM``, hidden 512, 4 layers, 8 heads, MLP 2048, vocabulary 8192,
  T=256;
* ``vit``: ``ViTForImageClassification``, 224x224 images in 16x16 patches (197 tokens),
  hidden 384, 4 layers, 6 heads, 100 classes;
* ``lstm``: embedding 512 -> 2-layer ``nn.LSTM`` 512 -> Linear, vocabulary 8192, T=64.

Contenders: ``plain``, the truegrad backends (``auto``, the default, ``nn``, ``patch_torch``,
``patch_model``, ``tg-backpack``) and the peers that compute the same statistic where they
run: BackPack ``SumGradSquared``, Opacus ``GradSampleModule``, ``torch.func``. A contender
that cannot run a model is reported with the error. Every truegrad contender's statistic is
exact on the parameters it covers; the "covered" column is the share of trainable
parameters (elements) that get one.

    python benchmarks/real_models.py                     # all models, ~10 minutes
    python benchmarks/real_models.py --models gpt2 llama --contenders plain auto
    python benchmarks/real_models.py --quick             # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from backward_overhead import _peak_mib, steady_malloc, time_block  # noqa: E402

StepFn = Callable[[], None]
Batch = tuple[dict[str, torch.Tensor], Callable[[Any], torch.Tensor]]


# ----------------------------------------------------------------------------- models


def gpt2() -> tuple[nn.Module, Batch]:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=8192, n_positions=256, n_embd=512, n_layer=4, n_head=8,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, 8192, (4, 256))
    return model, ({"input_ids": ids}, lambda out: F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()))


def llama() -> tuple[nn.Module, Batch]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 8192, (4, 256))
    return model, ({"input_ids": ids}, lambda out: F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()))


def bert() -> tuple[nn.Module, Batch]:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=8192, hidden_size=512, num_hidden_layers=4,
                        num_attention_heads=8, intermediate_size=2048, max_position_embeddings=256,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForMaskedLM(config)
    ids = torch.randint(0, 8192, (4, 256))
    return model, ({"input_ids": ids}, lambda out: F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()))


def vit() -> tuple[nn.Module, Batch]:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=4,
                       num_attention_heads=6, intermediate_size=1536, num_labels=100,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = ViTForImageClassification(config)
    x = torch.randn(4, 3, 224, 224)
    y = torch.randint(0, 100, (4,))
    return model, ({"pixel_values": x}, lambda out: F.cross_entropy(out.logits, y))


class LSTMLanguageModel(nn.Module):
    def __init__(self, vocab: int = 8192, dim: int = 512) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, num_layers=2, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(input_ids))[0])


def lstm() -> tuple[nn.Module, Batch]:
    ids = torch.randint(0, 8192, (4, 64))
    return LSTMLanguageModel(), ({"input_ids": ids}, lambda out: F.cross_entropy(out.flatten(0, 1), ids.flatten()))


MODELS: dict[str, Callable[[], tuple[nn.Module, Batch]]] = {
    "gpt2": gpt2, "llama": llama, "bert": bert, "vit": vit, "lstm": lstm,
}


# ----------------------------------------------------------------------------- contenders


def _zero(model: nn.Module) -> None:
    from truegrad import statistic

    params = list(model.parameters())
    for p in params:
        p.grad = None
    statistic.clear(params)


def plain(model: nn.Module, batch: Batch) -> StepFn:
    inputs, loss = batch

    def step() -> None:
        _zero(model)
        loss(model(**inputs)).backward()

    return step


def _truegrad(name: str) -> Callable[[nn.Module, Batch], StepFn]:
    def make(model: nn.Module, batch: Batch) -> StepFn:
        from truegrad.backends import get_backend
        from truegrad.utils import patch_torch, unpatch_torch

        backend = get_backend(name)
        backend.prepare(model)
        if name == "patch_torch":
            unpatch_torch()  # patched only while this contender steps
        inputs, loss = batch

        def step() -> None:
            _zero(model)
            with patch_torch() if name == "patch_torch" else backend.backward_context():
                out = model(**inputs)
                with backend.backward_context() if name == "patch_torch" else _nothing():
                    loss(out).backward()

        return step

    return make


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


def backpack_sgs(model: nn.Module, batch: Batch) -> StepFn:
    import backpack
    from backpack.extensions import SumGradSquared

    model = backpack.extend(model)
    inputs, loss = batch

    def step() -> None:
        _zero(model)
        with backpack.backpack(SumGradSquared()):
            loss(model(**inputs)).backward()

    return step


def opacus_sgs(model: nn.Module, batch: Batch) -> StepFn:
    from opacus import GradSampleModule

    wrapped = GradSampleModule(model, loss_reduction="mean")
    inputs, loss = batch

    def step() -> None:
        wrapped.zero_grad(set_to_none=True)
        loss(wrapped(**inputs)).backward()
        for p in wrapped.parameters():
            if getattr(p, "grad_sample", None) is not None:
                p.sum_grad_squared = p.grad_sample.square().sum(0)

    return step


def torch_func_sgs(model: nn.Module, batch: Batch) -> StepFn:
    from truegrad import testing

    inputs, loss = batch

    def step() -> None:
        grads = testing.per_sample_grads(model, lambda out, _: loss(out), inputs)
        for name, p in model.named_parameters():
            if name in grads:
                p.grad = grads[name].sum(0)
                p.sum_grad_squared = grads[name].square().sum(0)

    return step


CONTENDERS: dict[str, Callable[[nn.Module, Batch], StepFn]] = {
    "plain": plain,
    "auto": _truegrad("auto"),
    "nn": _truegrad("nn"),
    "patch_torch": _truegrad("patch_torch"),
    "patch_model": _truegrad("patch_model"),
    "tg-backpack": _truegrad("backpack"),
    "backpack": backpack_sgs,
    "opacus": opacus_sgs,
    "torch.func": torch_func_sgs,
}
OWN = ("auto", "nn", "patch_torch", "patch_model", "tg-backpack")


# ----------------------------------------------------------------------------- measurement


def build(name: str, contender: str) -> tuple[StepFn, nn.Module]:
    torch.manual_seed(0)
    model, batch = MODELS[name]()
    model = copy.deepcopy(model)
    return CONTENDERS[contender](model, batch), model


def coverage(model: nn.Module) -> float:
    from truegrad import statistic

    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    total = sum(p.numel() for p in params)
    return sum(p.numel() for p in params if statistic.has(p)) / max(total, 1)


def measure(name: str, contenders: list[str], rounds: int, memory: bool) -> dict[str, dict[str, Any]]:
    fns: dict[str, StepFn] = {}
    result: dict[str, dict[str, Any]] = {}
    for contender in contenders:
        try:
            fn, model = build(name, contender)
            fn()  # warm-up; also surfaces what a contender cannot run
            result[contender] = {"covered": coverage(model) if contender in OWN else None}
            fns[contender] = fn
        except Exception as error:  # noqa: BLE001 - reported, not fatal
            result[contender] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:70]}"}
    times: dict[str, list[float]] = {c: [] for c in fns}
    ratios: dict[str, list[float]] = {c: [] for c in fns}
    names = list(fns)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        block = {c: time_block(fns[c], 1) for c in order}
        for c, t in block.items():
            times[c].append(t)
            ratios[c].append(t / block["plain"])
    for c in fns:
        result[c]["ms"] = 1e3 * statistics.median(times[c])
        result[c]["ratio"] = statistics.median(ratios[c])
    if memory:
        peaks = {c: _peak_mib(fns[c]) for c in fns}
        for c in fns:
            result[c]["mib"] = peaks[c] - peaks["plain"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--quick", action="store_true", help="2 rounds, no memory")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.no_memory = 2, True
    contenders = ["plain", *[c for c in args.contenders if c != "plain"]]
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    malloc = "steady (glibc keeps freed memory)" if steady_malloc() else "glibc defaults"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, malloc: {malloc}; "
          f"median of {args.rounds} paired rounds; ratio = contender / plain in the same round")
    results = {}
    for name in args.models:
        res = measure(name, contenders, args.rounds, not args.no_memory)
        results[name] = res
        print(f"\n{name}")
        print(f"  {'contender':<12} {'ms/step':>9} {'x plain':>8} {'+MiB':>8} {'covered':>8}")
        for c in contenders:
            r = res[c]
            if "error" in r:
                print(f"  {c:<12} {'n/a':>9}  ({r['error']})")
                continue
            mib = f"{r['mib']:8.0f}" if "mib" in r else ""
            cov = f"{100 * r['covered']:7.1f}%" if r.get("covered") is not None else ""
            print(f"  {c:<12} {r['ms']:9.1f} {r['ratio']:8.2f} {mib:>8} {cov:>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
