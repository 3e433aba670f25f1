"""The lab's experiments: one module each, listed in :data:`REGISTRY`.

How to add one (``normlab lab run my-claim`` then just works, cached, in parallel, reported):

1. Write ``src/normlab/lab/experiments/my_claim.py`` with

   - ``CLAIM`` (str): the claim, in one or two sentences, as its source states it.
   - ``SOURCE`` (str): who claims it, where (paper, figure or table).
   - ``Config``: a frozen ``@dataclass`` of JSON-able fields (int, float, bool, str or tuples
     of them), each with a default and a docstring under it. A field ``data`` names a data
     set of :mod:`normlab.lab.data`.
   - ``SCALES``: ``{"smoke": Config(...), "quick": Config(...), "full": Config(...)}`` —
     smoke runs in a few seconds (tests), quick in the default suite's budget, full as
     close to the source as a CPU allows.
   - ``run(config, seed, progress) -> dict``: one seed, JSON-able metrics; call
     ``progress(fraction)`` now and then (it drives the progress bar).
   - ``summarize(config, runs: list[dict]) -> dict``: numbers over seeds (per-seed lists and
     aggregates), with ``"measured"``: one line for the report's summary table.
   - ``verdict(summary) -> normlab.lab.verdict.Verdict``: the rule, as code, quoting mean ± sd.
   - ``plots(config, runs, summary, out_dir) -> list[(filename, caption)]``: PNGs written
     into ``out_dir`` (helpers in :mod:`normlab.lab.plotting`). A plot of one seed names it:
     give ``plots`` a keyword ``seeds`` and the report passes the seed numbers of ``runs``
     (same order, ascending), so a caption can say which seed ``runs[0]`` is.

   Optional: ``ZERO_ALLOWED`` (int fields where 0 means something: every other int field
   with a default of 1 or more is a count that must stay at least 1, so is each item of a
   tuple of such ints, and a tuple with a non-empty default must stay non-empty),
   ``PUBLISHED`` (the source's numbers, shown beside the measurement), ``SCALE_NOTE``
   (what the scale can and cannot show), ``VERSION`` (int, default 1: bump it when ``run``
   changes meaning, so cached runs are not reused), ``validate(config)`` (raise ``ValueError``
   with one clear line for a bad combination of fields), and for ``--nproc N`` either
   ``DATA_PARALLEL = True`` or ``data_parallel(config) -> None | str`` (None: this config can
   run data-parallel; a string: the one-line reason it cannot). Declare it only when ``run``
   trains through :func:`normlab.lab.training.train` and does the same calls on every
   process (:mod:`normlab.lab.parallel`); experiments without it run in one process, as
   1-process runs, whatever ``--nproc`` says.

2. Add ``"my-claim": "normlab.lab.experiments.my_claim"`` to :data:`REGISTRY` (names use
   dashes, modules underscores).

``tests/lab/test_experiments.py`` then smoke-runs it and checks the contract.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import math
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Optional

REGISTRY = {
    "activations": "normlab.lab.experiments.activations",
    "bn-mnist": "normlab.lab.experiments.bn_mnist",
    "convergence": "normlab.lab.experiments.convergence",
    "learning-rate": "normlab.lab.experiments.learning_rate",
    "init-scale": "normlab.lab.experiments.init_scale",
    "batch-size": "normlab.lab.experiments.batch_size",
    "rnn": "normlab.lab.experiments.rnn",
    "padding": "normlab.lab.experiments.padding",
    "transformer": "normlab.lab.experiments.transformer",
    "regularization": "normlab.lab.experiments.regularization",
    "selu": "normlab.lab.experiments.selu",
    "invariance": "normlab.lab.experiments.invariance",
    "spectral-gan": "normlab.lab.experiments.spectral_gan",
}
SCALES = ("smoke", "quick", "full")
REQUIRED = ("CLAIM", "SOURCE", "Config", "SCALES", "run", "summarize", "verdict", "plots")


class ConfigError(ValueError):
    """Bad user input about experiments or their configs; the message is one line."""


def names() -> list:
    return list(REGISTRY)


@functools.lru_cache(maxsize=None)
def get(name: str) -> "Experiment":
    """The experiment registered as ``name`` (its module imported and checked)."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown experiment {name!r}; known: {', '.join(REGISTRY)}")
    module = importlib.import_module(REGISTRY[name])
    missing = [a for a in REQUIRED if not hasattr(module, a)]
    if missing:
        raise TypeError(f"experiment module {module.__name__} lacks {', '.join(missing)} (see normlab.lab.experiments)")
    if not (dataclasses.is_dataclass(module.Config) and module.Config.__dataclass_params__.frozen):
        raise TypeError(f"{module.__name__}.Config must be a frozen dataclass")
    if set(module.SCALES) != set(SCALES):
        raise TypeError(f"{module.__name__}.SCALES must have exactly the scales {SCALES}")
    return Experiment(name, module)


@dataclass(frozen=True)
class Experiment:
    """An experiment module behind a uniform interface."""

    name: str
    module: types.ModuleType

    @property
    def claim(self) -> str:
        return self.module.CLAIM

    @property
    def source(self) -> str:
        return self.module.SOURCE

    @property
    def published(self) -> str:
        return getattr(self.module, "PUBLISHED", "")

    @property
    def scale_note(self) -> str:
        return getattr(self.module, "SCALE_NOTE", "")

    @property
    def version(self) -> int:
        return int(getattr(self.module, "VERSION", 1))

    def config(self, scale: str = "quick", overrides: Optional[dict] = None):
        """The ``scale`` preset with ``overrides`` (field -> text from ``--set``) parsed and type-checked."""
        if scale not in SCALES:
            raise ConfigError(f"unknown scale {scale!r}; known: {', '.join(SCALES)}")
        base = self.module.SCALES[scale]
        if not overrides:
            return base
        types = typing.get_type_hints(self.module.Config)
        values = {}
        for key, text in overrides.items():
            if key not in types:
                raise ConfigError(f"--set {key}=...: {self.name} has no field {key!r}; "
                                  f"fields: {', '.join(types)}")
            values[key] = parse_value(f"{self.name}.{key}", text, types[key])
        return dataclasses.replace(base, **values)

    def from_dict(self, d: dict):
        """Rebuild a config from its ``config.json`` form (tuples come back as lists)."""
        types = typing.get_type_hints(self.module.Config)
        return self.module.Config(**{k: tuple(v) if isinstance(v, list) and typing.get_origin(types[k]) is tuple
                                     else v for k, v in d.items()})

    def validate(self, config, data_dir: Optional[str] = None) -> None:
        """Check a config before any training: counts and lists, its data set, plus the module's own
        ``validate``.

        The rule every experiment shares: an int field whose default (in ``Config``) is at least 1
        is a count (layers, steps, evals, a width) and must stay at least 1, as must each item of
        a tuple of such ints (hidden widths, batch sizes), and a tuple field with a non-empty
        default (learning rates, batch sizes, norms to compare) must stay non-empty.
        Otherwise such a value fails minutes later inside a run, or gives a verdict about nothing.
        A module lists the int fields for which 0 means something in ``ZERO_ALLOWED``.

        Every float must be finite. Learning rates (a field ``lr`` or ``*_lr``, and ``multipliers``
        of one) must be positive too: 0 trains nothing and a negative one climbs the loss, a
        comparison of nothing either way. A ``data`` field names a data set of images or signals (the
        ``padded-seq`` sequences, with a mask, are generated by the experiments that study them),
        loaded here (from ``data_dir`` for full MNIST) to check ``n_train`` and ``batch_size``
        against its training split."""
        from normlab.lab import data

        zero_ok = set(getattr(self.module, "ZERO_ALLOWED", ()))
        for f in dataclasses.fields(self.module.Config):
            value, default = getattr(config, f.name), f.default
            least = 0 if f.name in zero_ok else 1
            if _count(default) and default >= 1 and value < least:
                raise ConfigError(f"{self.name}: {f.name} counts something and must be at least {least}, got {value}")
            if isinstance(default, tuple) and default and not value:
                raise ConfigError(f"{self.name}: {f.name} must not be empty (default {default})")
            if (isinstance(default, tuple) and default and all(_count(d) and d >= 1 for d in default)
                    and any(v < least for v in value)):  # widths, batch sizes, depths: counts each
                raise ConfigError(f"{self.name}: {f.name} holds counts, each at least {least}, got "
                                  f"{','.join(map(str, value))}")
            rates = (value,) if f.name == "lr" or f.name.endswith("_lr") else value if f.name == "multipliers" else ()
            if any(not (isinstance(r, (int, float)) and 0 < r < math.inf) for r in rates):
                what = "learning rate multiplier" if f.name == "multipliers" else "learning rate"
                raise ConfigError(f"{self.name}: {f.name} is a {what} and must be positive and finite, got {value}")
        if hasattr(config, "data"):
            try:
                data.check_name(config.data)
            except data.DataError as e:
                raise ConfigError(f"{self.name}: {e}") from None
            if config.data == "padded-seq":
                raise ConfigError(f"{self.name}: data must be a data set of images or signals "
                                  f"({', '.join(n for n in data.DATASETS if n != 'padded-seq')}); padded-seq's "
                                  f"masked sequences are generated by the padding and rnn experiments")
            try:  # (full MNIST from data_dir; the other sets are generated or shipped)
                ds = data.load(config.data, data_dir)
            except data.DataError as e:
                raise ConfigError(f"{self.name}: {e}") from None
            self._check_sizes(config, ds)
        if hasattr(self.module, "validate"):
            try:
                self.module.validate(config)
            except ValueError as e:
                raise ConfigError(f"{self.name}: {e}") from None
        # what no rule above named: no field means NaN or inf (and a run's config.json stores NaN as null)
        for f in dataclasses.fields(self.module.Config):
            value = getattr(config, f.name)
            items = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in items):
                raise ConfigError(f"{self.name}: {f.name} must be finite, got {value}")

    def _check_sizes(self, config, ds) -> None:
        """``n_train`` and ``batch_size`` against the training split of the config's data set
        ``ds``, ``probe`` against its test split: a larger ``n_train`` silently trained on what
        there is (the report still showed the number asked for), a batch larger than the split
        failed inside every run, and a larger probe used the whole test split while the
        captions said ``probe`` images."""
        available = len(ds.y_train)
        n_train = getattr(config, "n_train", None)
        if n_train is not None and n_train > available:
            raise ConfigError(f"{self.name}: n_train={n_train}, but {config.data} has {available} training examples")
        batch = getattr(config, "batch_size", None)
        if batch is not None and batch > min(available, n_train or available):
            raise ConfigError(f"{self.name}: batch_size={batch} is larger than the training set "
                              f"({min(available, n_train or available)} examples of {config.data})")
        probe = getattr(config, "probe", None)  # test inputs the activation probes read (the captions say how many)
        if probe is not None and probe > len(ds.y_test):
            raise ConfigError(f"{self.name}: probe={probe}, but {config.data} has {len(ds.y_test)} test examples")

    def data_parallel(self, config) -> Optional[str]:
        """None if ``config`` can run data-parallel (``--nproc N``), else the one-line reason why not."""
        check = getattr(self.module, "data_parallel", None)
        if check is not None:
            return check(config)
        if getattr(self.module, "DATA_PARALLEL", False):
            return None
        return "not declared data-parallel (no DATA_PARALLEL in its module)"

    def config_hash(self, config, nproc: int = 1, data_source=None) -> str:
        """12 hex digits of the SHA-256 of the experiment, its version and its config: the cache key.
        A data-parallel run (``nproc`` > 1) is a different entry, so it never replaces a 1-process run;
        so is a run on data from other files (``data_source``: :func:`normlab.lab.data.source_key`)."""
        key = {"experiment": self.name, "version": self.version, "config": dataclasses.asdict(config)}
        if nproc > 1:
            key["nproc"] = nproc
        if data_source is not None:
            key["data_source"] = data_source
        blob = json.dumps(key, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def field_docs(self) -> dict:
        return field_docs(self.module.Config)


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_value(what: str, text: str, tp):
    """``text`` as a value of type ``tp`` (bool, int, float, str, ``tuple[T, ...]``, ``Optional[T]``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if text.strip().lower() in ("none", "null", ""):
            return None
        return parse_value(what, text, next(a for a in args if a is not type(None)))
    if origin is tuple:
        item = args[0]
        parts = [p.strip() for p in text.split(",") if p.strip()]
        return tuple(parse_value(what, p, item) for p in parts)
    parsers = {bool: _parse_bool, int: int, float: float, str: str}
    if tp not in parsers:
        raise ConfigError(f"--set {what}: unsupported field type {tp}")
    try:
        return parsers[tp](text)
    except ValueError:
        kind = {bool: "a bool (true/false)", int: "an int", float: "a float"}[tp]
        raise ConfigError(f"--set {what}={text}: {what.split('.')[-1]} must be {kind}, got {text!r}") from None


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def field_docs(cls) -> dict:
    """The docstring under each field of a dataclass, read from its source (empty if none)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
