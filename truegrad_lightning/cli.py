"""The ``truegrad-lightning`` command (also ``python -m truegrad_lightning``); docs/cli.md is its guide.

A :class:`~lightning.pytorch.cli.LightningCLI` with the Trainer's subcommands ``fit``,
``validate``, ``test`` and ``predict``, and two of its own: ``diagnose`` (what a backend
covers on the configured model, :func:`truegrad.diagnose` on one training batch) and
``configs`` (the built-in configs with their descriptions)::

    truegrad-lightning configs
    truegrad-lightning fit --config digits_cnn
    truegrad-lightning fit --config digits_cnn --trainer.max_epochs=3 --truegrad.backend=nn
    truegrad-lightning diagnose --config char_gpt --truegrad.backend=backpack
    truegrad-lightning fit --model CNNClassifier --data DigitsDataModule

``--config NAME`` takes a built-in config by name (they ship inside the package, in
``truegrad_lightning/configs/``; ``configs/`` of the repository holds the same files) or a
path. The optimizer is **not** built by the CLI (``auto_configure_optimizers=False``):
models take an ``OptimizerCallable`` (default :class:`~truegrad.optim.TGAdamW`) and build it
in ``configure_optimizers``. After parsing, before anything runs, the CLI builds that
optimizer (and its schedule) once on a dummy parameter, so a bad ``lr`` stops the command
with the field named; when it is a TGAdamW that needs ``p.sum_grad_squared`` and no
:class:`~truegrad_lightning.TrueGradCallback` is configured, ``fit`` adds one and says so in
one line. ``--truegrad.backend`` sets the backend of every TrueGradCallback (with or
without a config). Option names are never abbreviated (``--trainer.max_epoch`` is an
error), and errors are a few lines: the field, the value, what is valid, and ``--help``.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NoReturn, Optional

import torch
from jsonargparse import Namespace
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

# imported so that --model and --data take the built-in classes by name (CNNClassifier)
import truegrad_lightning.data
import truegrad_lightning.models
from truegrad.optim.tgadamw import TGAdamW
from truegrad_lightning.callback import TrueGradCallback
from truegrad_lightning.evaluation import prepare_cli_evaluation
from truegrad_lightning.terminal import quiet_lightning, quiet_trainer

__all__ = [
    "CONFIG_DIR",
    "PROG",
    "TrueGradCLI",
    "TrueGradArgumentParser",
    "builtin_configs",
    "condense_error",
    "fit_summary",
    "main",
    "resolve_config",
    "training_step_loss",
]

PROG = "truegrad-lightning"
#: The built-in configs, shipped as package data (``configs/`` of the repository holds
#: identical copies; tests/lightning/test_cli_configs.py checks that they are).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
Backend = Literal["auto", "nn", "patch_torch", "patch_model", "backpack"]
_TRAINER_SUBCOMMANDS = LightningCLI.subcommands()
_OWN_SUBCOMMANDS = {
    "diagnose": "Run truegrad.diagnose on one training batch of the configured model: "
    "coverage, error against the exact oracle, time and memory (exit 1 if a parameter "
    "would be uncovered).",
    "configs": "List the built-in configs (use them by name: --config NAME).",
}
_HELP_HINT = "every option: {prog} --help; the guide: docs/cli.md"


# ---------------------------------------------------------------------------- configs


def builtin_configs() -> dict[str, tuple[Path, str]]:
    """``{name: (path, one-line description)}`` of the configs shipped in the package; the
    description is the first line of the file, a ``#`` comment."""
    found: dict[str, tuple[Path, str]] = {}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[:1]
        description = first[0].lstrip("#").strip() if first and first[0].startswith("#") else ""
        found[path.stem] = (path, description)
    return found


def resolve_config(value: str) -> str:
    """The file behind ``--config value``: an existing path as given, else a built-in
    config named ``value`` (with or without ``.yaml``). Anything else is returned
    unchanged (the parser then reports the missing file, with the built-in names)."""
    if Path(value).expanduser().exists():
        return value
    name = value.removesuffix(".yaml")
    configs = builtin_configs()
    if name in configs and "/" not in name and "\\" not in name:
        return str(configs[name][0])
    return value


def _resolve_config_args(args: list[str]) -> list[str]:
    out: list[str] = []
    take_next = False
    for arg in args:
        if take_next:
            out.append(resolve_config(arg))
            take_next = False
        elif arg in ("-c", "--config"):
            out.append(arg)
            take_next = True
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg[len("--config="):]))
        else:
            out.append(arg)
    return out


def _configs_table() -> str:
    configs = builtin_configs()
    width = max((len(n) for n in configs), default=0)
    lines = [f"{name.ljust(width)}  {description}" for name, (_, description) in configs.items()]
    lines.append(f"\nuse one by name: {PROG} fit --config NAME (files in {CONFIG_DIR})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- errors

_STRUCTURE = (
    "Not a valid subclass of",
    "Subclass types expect",
    "a class path (str)",
    "a dict with",
    "a dict without",
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "- Expected a <class 'NoneType'>",
    "Problem with given class_path",
    "Parser key",
)


def _short_type(text: str) -> str:
    text = re.sub(r"<class '(?:builtins\.)?([\w.]+)'>", r"\1", text)
    return text.replace("typing.", "")


def _accepted_options(class_path: str | None) -> str | None:
    if not class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls).parameters.values()
    except Exception:  # noqa: BLE001 - only a hint
        return None
    names = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return ", ".join(names) if names else None


def condense_error(message: str) -> str:
    """jsonargparse's nested error message in one or a few lines: the field, the value
    given, what is wrong and what is valid."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return message
    first = re.match(r'Parser key "([^"]+)":\s*(.*)', lines[0])
    if first is None:
        return "\n".join(lines[:3])
    field, rest = first.group(1), first.group(2)
    nested = re.search(r"NestedArg\(key='([^']*)', val=(.*)\)\s*$", message, re.MULTILINE)
    value: str | None = None
    if nested:
        key = nested.group(1)
        field = f"{field}.{key}" if key.startswith("init_args.") else f"{field}.init_args.{key}"
        value = nested.group(2).strip("'")
    else:
        for key in dict.fromkeys(re.findall(r'Parser key "([^"]+)"', message)[1:]):
            field = f"{field}.init_args.{key}"
        option = re.search(r"Option '([^']+)' is not accepted", message)
        if option:
            field = f"{field}.init_args.{option.group(1)}"
        given = [line for line in lines if line.startswith("Given value:")]
        if given:
            value = given[-1][len("Given value:"):].strip()
        if value is not None and value[:1] in "{[":  # a whole section of a config file
            inner = re.findall(r"Got value: (?!Namespace\()(.*)$", message, re.MULTILINE)
            value = inner[-1].strip() if inner and not option else None
    classes = re.findall(r"Problem with given class_path '([^']+)'", message)
    reasons: list[str] = []
    if rest:
        reasons.append(rest)
    for line in lines[1:]:
        line = line.lstrip("- ").strip()
        if not line or line.startswith(_STRUCTURE) or line == "Expected a <class 'NoneType'>":
            continue
        inner = re.search(r"Got value: Namespace\(class_path='([^']+)'", line)
        owners = [inner.group(1)] if inner else classes
        line = re.sub(r"^Type .* expects a function or a callable class: ", "", line)
        line = re.sub(r"\. Got value: Namespace\(.*$", "", line)
        if line.startswith(_STRUCTURE):
            continue
        literal = re.match(r"Expected a (?:typing\.)?Literal\[(.*)\](?:\. Got value: (.*))?$", line)
        option = re.match(r"Option '([^']+)' is not accepted", line)
        if literal:
            line = f"valid values: {literal.group(1)}"
            value = value if value is not None else literal.group(2)
        elif option:
            accepted = _accepted_options(owners[0] if len(owners) == 1 else None)
            owner = " / ".join(c.rpartition(".")[2] for c in owners) or "the class"
            line = f"{owner} has no option {option.group(1)!r}"
            if accepted:
                line += f" (its options: {accepted})"
        else:
            got = re.match(r"(Expected a .*?)\. Got value: (.*)", line)
            if got:
                line = got.group(1)
                value = value if value is not None else got.group(2)
            line = re.sub(r"^Expected a (\S)", lambda m: "expected " + ("an " if m.group(1) in "aeiouAEIOU" else "a ") + m.group(1), _short_type(line))
            if line.startswith("expected a <"):
                line = line.replace("expected a <", "expected <")
        if line not in reasons:
            reasons.append(line)
    if field.startswith("trainer.callbacks") and field.endswith(".backend"):
        reasons.append("the TrueGradCallback's backend is set with --truegrad.backend")
    if field in ("model", "data") and any("import path" in r for r in reasons):
        package = truegrad_lightning.models if field == "model" else truegrad_lightning.data
        names = [n for n in package.__all__ if inspect.isclass(getattr(package, n))]
        reasons = [f"not a class (built-in ones by name: {', '.join(names)}; any other by class_path)"]
    if field == "config" and any("does not exist" in r for r in reasons):
        missing = re.search(r"does not exist: '([^']+)'", message)
        stem = Path(missing.group(1)).name.removesuffix(".yaml") if missing else ""
        close = difflib.get_close_matches(stem, list(builtin_configs()), n=1, cutoff=0.75)
        if close:
            reasons.append(f"did you mean the built-in config {close[0]!r}?")
        reasons.append(f"built-in configs (by name): {', '.join(builtin_configs())}")
    head = f"{field}={value}" if value is not None else field
    return f"{head}: " + "; ".join(reasons[:4]) if reasons else head


def _did_you_mean(parser: Any, message: str) -> str:
    match = re.match(r"unrecognized arguments: (\S+)", message)
    if not match:
        return message
    given = match.group(1).split("=", 1)[0]
    options = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    close = difflib.get_close_matches(given, options, n=1, cutoff=0.8)
    if close:
        message += f" (did you mean {close[0]}?)"
    return message


class TrueGradArgumentParser(LightningArgumentParser):
    """Lightning's parser with short errors: the field, the bad value, what is valid and
    where the full usage is, instead of a usage dump of every option."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        from jsonargparse._common import debug_mode_active

        if not self.exit_on_error or debug_mode_active():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        text = condense_error(_did_you_mean(parser, message))
        sys.stderr.write(f"{prog}: error: {text}\n{_HELP_HINT.format(prog=prog)}\n")
        self.exit(2)


# ---------------------------------------------------------------------------- the CLI


class TrueGradCLI(LightningCLI):
    """LightningCLI for truegrad: any model / datamodule class by ``class_path`` (or by
    class name), the optimizer built by the model and checked before running, a
    TrueGradCallback added when the optimizer needs the statistic, ``--truegrad.backend``,
    built-in configs by name, the subcommands ``diagnose`` and ``configs``, the config
    saved next to the logs, and a readable summary after ``fit`` (:func:`fit_summary`).

    Keyword arguments are LightningCLI's; these defaults differ: ``model_class=None``
    and ``datamodule_class=None`` (any subclass, chosen in the config),
    ``auto_configure_optimizers=False``, ``save_config_kwargs={"overwrite": True}``,
    ``parser_class=TrueGradArgumentParser`` and ``parser_kwargs`` with
    ``prog="truegrad-lightning"`` and ``allow_abbrev=False``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", TrueGradArgumentParser)
        parser_kwargs = dict(kwargs.get("parser_kwargs") or {})
        parser_kwargs.setdefault("description", "Train with TrueGrad-AdamW (truegrad). Guide: docs/cli.md")
        parser_kwargs.setdefault("prog", PROG)
        parser_kwargs.setdefault("allow_abbrev", False)
        kwargs["parser_kwargs"] = parser_kwargs
        quiet_lightning()
        self.added_callback: TrueGradCallback | None = None
        self.diagnose_report: Any = None
        super().__init__(*args, **kwargs)

    # ---------------------------------------------------------------- parser
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**_TRAINER_SUBCOMMANDS, **{name: set() for name in _OWN_SUBCOMMANDS}}

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("allow_abbrev", False)
        parser = super().init_parser(**kwargs)
        for action in parser._actions:
            if "--config" in action.option_strings:
                action.help = (
                    "A built-in config by name (see the subcommand `configs`), or the path of "
                    "a configuration file in yaml or json format."
                )
        return parser

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        from lightning.pytorch.cli import _get_short_description, class_from_function

        self._subcommand_parsers: dict[str, LightningArgumentParser] = {}
        subcommands = parser.add_subcommands()
        trainer_class = (
            self.trainer_class if isinstance(self.trainer_class, type) else class_from_function(self.trainer_class)
        )
        for name in self.subcommands():
            sub_kwargs = dict(kwargs.get(name, {}))
            if name in _OWN_SUBCOMMANDS:
                description = _OWN_SUBCOMMANDS[name]
                sub_kwargs.setdefault("description", description)
                if name == "configs":
                    sub = self.parser_class(**{"allow_abbrev": False, **sub_kwargs})
                else:
                    sub = self.init_parser(**sub_kwargs)
                    self._add_arguments(sub)
                    sub.add_argument("--repeats", type=int, default=3,
                                     help="Paired timing repeats (the median ratio is reported).")
                    sub.add_argument("--measure_memory", type=bool, default=True,
                                     help="Also measure peak memory (on CPU with torch.profiler).")
                self._subcommand_method_arguments[name] = []
            else:
                description = _get_short_description(getattr(trainer_class, name))
                sub_kwargs.setdefault("description", description)
                sub = self._prepare_subcommand_parser(trainer_class, name, **sub_kwargs)
            self._subcommand_parsers[name] = sub
            subcommands.add_subcommand(name, sub, help=description)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--truegrad.backend",
            type=Optional[Backend],  # noqa: UP045 - a runtime type for jsonargparse
            default=None,
            help=(
                "The truegrad backend of every TrueGradCallback (and of the one fit adds when "
                "the optimizer needs the statistic); null keeps the configured one ('auto' "
                "when the CLI adds the callback)."
            ),
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Lightning's, after ``--config NAME`` of a built-in config became its path."""
        argv = sys.argv
        if args is None:
            args = argv[1:]
            sys.argv = argv[:1]  # the arguments are given once (Lightning warns otherwise)
        try:
            if isinstance(args, (list, tuple)):
                args = _resolve_config_args([str(a) for a in args])
            super().parse_arguments(parser, args)
        finally:
            sys.argv = argv

    def _set_seed(self) -> None:
        if self.subcommand != "configs":
            super()._set_seed()

    # ---------------------------------------------------------------- instantiation
    def _callback_entries(self) -> list[Namespace]:
        """The TrueGradCallback entries of ``trainer.callbacks`` in the parsed config."""
        trainer = self._get(self.config, "trainer") or Namespace()
        callbacks = trainer.get("callbacks")
        if callbacks is None:
            return []
        if not isinstance(callbacks, list):
            callbacks = [callbacks]
        return [c for c in callbacks if isinstance(c, Namespace) and _is_truegrad_callback(c.get("class_path"))]

    def _requested_backend(self) -> str | None:
        return (self._get(self.config, "truegrad") or Namespace()).get("backend")

    def before_instantiate_classes(self) -> None:
        backend = self._requested_backend()
        if backend is not None:
            for entry in self._callback_entries():
                if entry.get("init_args") is None:
                    entry["init_args"] = Namespace()
                entry.init_args.backend = backend

    def instantiate_classes(self) -> None:
        self.trainer = None  # type: ignore[assignment]
        if self.subcommand == "configs":
            self.config_init, self.model, self.datamodule = self.config, None, None  # type: ignore[assignment]
            return
        self.config_init = self.parser.instantiate(self.config)
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "model")
        needs_statistic = self._check_optimizer()
        if self.subcommand == "diagnose":
            return
        if self.subcommand == "fit" and not self._has_truegrad_callback():
            backend = self._requested_backend()
            if needs_statistic or backend is not None:
                self._add_truegrad_callback(backend or "auto", needs_statistic)
        self._add_configure_optimizers_method_to_model(self.subcommand)
        self.trainer = self.instantiate_trainer()

    def _check_optimizer(self) -> bool:
        """Build the model's optimizer (and schedule) once on a dummy parameter: a bad
        argument stops the command here, naming the field. Returns whether the optimizer
        is a TGAdamW that needs ``p.sum_grad_squared`` (a group with
        ``default_to_adam=False``)."""
        factory = getattr(self.model, "optimizer_factory", None)
        if not callable(factory):
            return False
        field = "model.init_args.optimizer"
        dummy = torch.nn.Parameter(torch.zeros(1))
        try:
            optimizer = factory([dummy])
        except (TypeError, ValueError) as error:
            self._error(f"{field}: {_one_line(error)}")
        scheduler_factory = getattr(self.model, "lr_scheduler_factory", None)
        if callable(scheduler_factory):
            try:
                scheduler_factory(optimizer)
            except (TypeError, ValueError) as error:
                self._error(f"model.init_args.lr_scheduler: {_one_line(error)}")
        return isinstance(optimizer, TGAdamW) and any(
            not group.get("default_to_adam", False) for group in optimizer.param_groups
        )

    def _error(self, message: str) -> NoReturn:
        parser = self._parser(self.subcommand)
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {message}\n{_HELP_HINT.format(prog=prog)}\n")
        raise SystemExit(2)

    def _has_truegrad_callback(self) -> bool:
        if self._callback_entries():
            return True
        defaults = self.trainer_defaults.get("callbacks") or []
        defaults = defaults if isinstance(defaults, list) else [defaults]
        return any(isinstance(c, TrueGradCallback) for c in defaults)

    def _add_truegrad_callback(self, backend: str, needs_statistic: bool) -> None:
        """Add a TrueGradCallback to the config (so the saved config has it) and to the
        callbacks being instantiated, and say so in one line."""
        entry = Namespace(
            class_path="truegrad_lightning.TrueGradCallback",
            init_args=Namespace(backend=backend, chunk_bytes=None, log_statistics=False, bitwise_grad=None),
        )
        for config, item in ((self.config, entry), (self.config_init, None)):
            trainer = config.get(str(self.subcommand), config).get("trainer")
            callbacks = trainer.get("callbacks")
            if callbacks is None:
                callbacks = []
            elif not isinstance(callbacks, list):
                callbacks = [callbacks]
            if item is None:
                self.added_callback = TrueGradCallback(backend=backend)
                item = self.added_callback
            trainer["callbacks"] = [*callbacks, item]
        why = (
            "the model's TGAdamW needs p.sum_grad_squared"
            if needs_statistic
            else "--truegrad.backend asks for the statistic"
        )
        if rank_zero_only.rank == 0:
            print(
                f"{PROG}: added TrueGradCallback(backend={backend!r}) because {why} and no "
                "TrueGradCallback is configured (choose the backend with --truegrad.backend)",
                file=sys.stderr,
            )

    # ---------------------------------------------------------------- running
    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand in _OWN_SUBCOMMANDS:
            getattr(self, f"run_{subcommand}")()
        else:
            super()._run_subcommand(subcommand)

    def run_configs(self) -> None:
        print(_configs_table())

    def run_diagnose(self) -> None:
        """``truegrad.diagnose`` on the first training batch, with the configured backend."""
        backend = self._requested_backend()
        if backend is None:
            entries = self._callback_entries()
            backend = (entries[0].get("init_args") or Namespace()).get("backend", "auto") if entries else "auto"
        options = self.config_init.get("diagnose", self.config_init)
        trainer_config = self._get(self.config_init, "trainer") or {}
        capture = _DiagnoseFirstBatch(backend, options.get("repeats", 3), options.get("measure_memory", True))
        trainer = Trainer(
            accelerator=trainer_config.get("accelerator", "auto"),
            devices=1,
            max_steps=1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[capture],
        )
        try:
            trainer.fit(self.model, datamodule=self.datamodule)
        except _Diagnosed:
            pass
        report = self.diagnose_report = capture.report
        if report is None:
            self._error("diagnose: the Trainer ended before the first training batch (no training data?)")
        print(report)
        if report.uncovered:
            print(
                f"{PROG} diagnose: {len(report.uncovered)} trainable parameter(s) get no statistic with "
                f"backend {backend!r}: {', '.join(report.uncovered)}; a TGAdamW with "
                "default_to_adam=False would stop at the first step (try another --truegrad.backend, "
                "or give the optimizer default_to_adam: true)",
                file=sys.stderr,
            )
            raise SystemExit(1)
        print(f"{PROG} diagnose: every trainable parameter the loss reaches is covered by backend {backend!r}")

    def before_fit(self) -> None:
        quiet_trainer(self.trainer)  # one-line summary, no v_num, no "Epoch 0/-2"

    def before_validate(self) -> None:
        """The checkpoint to evaluate (the latest run's best one when none is given, said in
        one line; never an untrained model), results in that run's folder, predictions
        written (:mod:`truegrad_lightning.evaluation`)."""
        quiet_trainer(self.trainer)
        prepare_cli_evaluation(self)

    before_test = before_validate
    before_predict = before_validate

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            sample = _sample_text(self.model, self.datamodule)
            if sample is not None:
                print(f"sample after training:\n{sample}\n")
            print(fit_summary(self.trainer))


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _is_truegrad_callback(class_path: Any) -> bool:
    if not isinstance(class_path, str):
        return False
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 - the parser already checked it
        return False
    return isinstance(cls, type) and issubclass(cls, TrueGradCallback)


# ---------------------------------------------------------------------------- diagnose


class _Diagnosed(Exception):
    """Stops the diagnosing Trainer after the first batch."""


class _DiagnoseFirstBatch(Callback):
    """Runs :func:`truegrad.diagnose` on the first training batch, where the model is set
    up (``configure_model`` ran) and the batch is on the model's device, then stops."""

    def __init__(self, backend: str, repeats: int, measure_memory: bool) -> None:
        self.backend, self.repeats, self.measure_memory = backend, repeats, measure_memory
        self.report: Any = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        from truegrad import diagnose

        inputs, loss_fn = training_step_loss(pl_module, batch)
        self.report = diagnose(pl_module, inputs, loss_fn, batch, backend=self.backend,
                               repeats=self.repeats, measure_memory=self.measure_memory)
        raise _Diagnosed


def training_step_loss(module: LightningModule, batch: Any) -> tuple[Any, Any]:
    """``(inputs, loss_fn)`` for :func:`truegrad.diagnose` from a LightningModule's
    ``training_step``: ``inputs`` are the arguments ``training_step`` gives the model
    (``self(...)``) for ``batch``, and ``loss_fn(output, batch)`` runs ``training_step``
    on a copy of the module whose forward returns ``output``, so the loss is exactly the
    one trained on. ``self.log`` is a no-op there. The step must call the model once.

    Raises:
        ValueError: ``training_step`` calls the model other than once.
        TypeError: ``training_step`` returns no loss tensor.
    """
    loss_module = copy.deepcopy(module)
    loss_module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    loss_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    calls: list[tuple[tuple, dict]] = []
    forward = loss_module.forward

    def record(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return forward(*args, **kwargs)

    loss_module.forward = record  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            _loss_of(loss_module.training_step(batch, 0))
    finally:
        del loss_module.forward
    name = type(module).__name__
    if len(calls) != 1:
        raise ValueError(
            f"diagnose needs a training_step that calls the model (self(...)) exactly once; "
            f"{name}.training_step called it {len(calls)} times"
        )
    args, kwargs = calls[0]
    if args and kwargs:
        raise ValueError(f"diagnose: {name}.training_step calls the model with positional and keyword arguments")
    inputs: Any = kwargs if kwargs else (args[0] if len(args) == 1 and isinstance(args[0], torch.Tensor) else args)

    def loss_fn(output: Any, targets: Any) -> torch.Tensor:
        loss_module.forward = lambda *args, **kwargs: output  # type: ignore[method-assign]
        try:
            return _loss_of(loss_module.training_step(targets, 0))
        finally:
            del loss_module.forward

    return inputs, loss_fn


def _loss_of(result: Any) -> torch.Tensor:
    loss = result.get("loss") if isinstance(result, Mapping) else result
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"diagnose: training_step returned {type(result).__name__}, not a loss tensor")
    return loss


# ---------------------------------------------------------------------------- fit summary


def fit_summary(trainer: Trainer) -> str:
    """One line after ``fit``: steps, the final validation metrics, and where the
    checkpoint and the metrics CSV were written."""
    metrics = {
        name: float(value)
        for name, value in sorted(trainer.callback_metrics.items())
        if name.startswith("val_") and isinstance(value, torch.Tensor) and value.numel() == 1
    }
    shown = " ".join(
        f"{name}={value:.4f}" if math.isfinite(value) else f"{name}={value}"
        for name, value in metrics.items()
    )
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    if isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
        # ddp_fork / ddp_spawn: the loops ran in the workers; weights, metrics and the
        # checkpoint path came back, the step counters did not
        parts = [f"fit done in {trainer.world_size} worker processes"]
    else:
        parts = [f"fit done: {trainer.global_step} steps, {trainer.current_epoch} epochs"]
    parts.append(shown or "no validation metrics")
    checkpoint = trainer.checkpoint_callback
    path = getattr(checkpoint, "best_model_path", "") or getattr(checkpoint, "last_model_path", "")
    parts.append(f"checkpoint: {path or 'none written'}")
    csv = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
    if csv is not None:
        parts.append(f"metrics CSV: {csv.experiment.metrics_file_path}")
    elif trainer.loggers and trainer.loggers[0].log_dir:
        parts.append(f"logs: {trainer.loggers[0].log_dir}")
    return " | ".join(parts)


def _sample_text(model: LightningModule, datamodule: LightningDataModule | None) -> str | None:
    """200 characters sampled from a character LM after ``fit`` (``None`` for others)."""
    generate = getattr(model, "generate", None)
    decode = getattr(datamodule, "decode", None)
    encode = getattr(datamodule, "encode", None)
    if generate is None or decode is None or encode is None:
        return None
    was_training = model.training
    model.eval()
    try:
        try:
            prompt = encode("\n")[None].to(model.device)
        except (KeyError, ValueError):  # no newline in the vocabulary
            prompt = torch.zeros(1, 1, dtype=torch.long, device=model.device)
        generator = torch.Generator(model.device).manual_seed(0)
        ids = generate(prompt, max_new_tokens=200, temperature=0.8, generator=generator)
    finally:
        model.train(was_training)
    return decode(ids[0, 1:].tolist())




def main(args: ArgsType = None) -> None:
    """Entry point of ``truegrad-lightning``; ``args`` replaces ``sys.argv[1:]``."""
    quiet_lightning()
    TrueGradCLI(args=args)


if __name__ == "__main__":  # pragma: no cover
    main()
