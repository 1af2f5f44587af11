"""The ``repinf-lens`` command line: thin subcommands over the public API.

Errors: every setting is checked when the command line is parsed (``--max-iter 0``, ``--damping -1``,
``--prefilter-fraction 2``, ``--device cuda`` on a machine without CUDA ...), before any model is loaded. A user
error (a bad setting or input file, a missing path, no network, our ``"<problem>. Fix: <what to do>"`` errors:
``ValueError``, ``OSError``, ``KeyError``, :class:`repinf_lens.errors.RepinfLensError` ...) prints one line,
``repinf-lens: error: <message>``, to stderr and exits with code 2. Anything else is taken for a bug in
repinf-lens: one line ``repinf-lens: internal error: <type>: <message> ...`` asking to rerun with ``--debug`` and
report it, exit code 1. ``--debug`` (before or after the subcommand) prints the full traceback in both cases.
Ctrl-C exits with code 130.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from repinf_lens._io import write_json_atomic
from repinf_lens.errors import CorruptFileError, RepinfLensError, SettingsError

__all__ = ["build_parser", "main"]

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


# ---------------------------------------------------------------------------------------------- argument types
# argparse calls these on the text of an option; an ArgumentTypeError becomes "argument --x: <message>".
def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
    if value < minimum:
        what = "1 or more" if minimum == 1 else f"{minimum} or a larger whole number"
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}. Fix: pass {what}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (``--batch-size``, ``--max-iter``, ``--top-examples`` ...)."""
    return _whole_number(text, 1)


def nonneg_int(text: str) -> int:
    """An integer >= 0 (``--n-boot 0`` = no bootstrap intervals, layer numbers)."""
    return _whole_number(text, 0)


_DEFAULT_RANKINGS = ("influence_eq16", "influence", "activation", "frequency", "random")  # analysis.DEFAULT_RANKINGS
_RANKINGS_HELP = "latent rankings to compare; the first is the reference of the verdicts"


def _block_range(text: str) -> tuple[int, ...]:
    """``24-29`` or ``20,22,24``: block indices (``--lora-layers``)."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected blocks like 24-29 or 20,22, got {text!r}") from None
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"expected block indices >= 0 like 24-29, got {text!r}")
    return tuple(sorted(set(out)))


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}. Fix: pass a finite number")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (``--lr``, ``--epochs``)."""
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}. Fix: pass a positive number")
    return value


def nonneg_float(text: str) -> float:
    """A finite number >= 0 (``--damping``)."""
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}. Fix: pass 0 or a positive number")
    return value


def fraction(text: str) -> float:
    """A share in (0, 1] (``--prefilter-fraction 0.05`` keeps each query's top 5 %)."""
    value = _finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"must be in (0, 1], got {text}. Fix: pass a share such as 0.05 (the top 5 %; the paper: 0.01-0.1)"
        )
    return value


_DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def device_spec(text: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (whether the machine has it is checked before any loading)."""
    if not _DEVICE_RE.match(text.strip().lower()):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}. Fix: pass cpu, cuda, cuda:N (e.g. cuda:1) or mps")
    return text.strip().lower()


def shard_spec(text: str) -> tuple[int, int]:
    """``I/N`` with ``0 <= I < N`` (``--shard 0/2``)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like I/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text}: need 0 <= I < N. Fix: e.g. --shard 0/2 and --shard 1/2")
    return i, n


def sae_size(text: str) -> tuple[int, int]:
    """``D x K`` (``2048x64``: d_sae 2048 with 64 active latents), both >= 1."""
    try:
        d, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected d_sae x k pairs such as 2048x64, got {text!r}") from None
    if d < 1 or k < 1:
        raise argparse.ArgumentTypeError(f"d_sae and k must be >= 1, got {text!r}. Fix: e.g. 2048x64")
    return d, k


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``repinf-lens: error: <message>`` (exit code 2), no usage block."""

    def error(self, message: str) -> NoReturn:
        hint = "" if "Fix:" in message else f" (see `{self.prog} --help`)"
        self.exit(2, f"repinf-lens: error: {_one_line(message)}{hint}\n")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _check_device(device: str | None) -> None:
    """Refuse a device this machine does not have, before anything is loaded."""
    if device is None or device == "cpu":
        return
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SettingsError(
                f"--device {device}: CUDA is not available here (torch {torch.__version__}, CUDA build: "
                f"{torch.version.cuda or 'none'}). Fix: pass --device cpu, or run on a machine with an NVIDIA GPU "
                "and a CUDA build of torch."
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        count = torch.cuda.device_count()
        if index >= count:
            raise SettingsError(
                f"--device {device}: this machine has {count} CUDA device(s). Fix: pass --device cuda:0"
                + (f" ... cuda:{count - 1}" if count > 1 else "")
                + " or --device cpu."
            )
    if device == "mps" and not torch.backends.mps.is_available():
        raise SettingsError("--device mps: Apple's MPS backend is not available here. Fix: pass --device cpu.")


# ---------------------------------------------------------------------------------------------- input files
def _probe(path: Path) -> str | None:
    """Why ``path`` (a JSON, YAML or safetensors file) cannot be parsed, or ``None`` when it can."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            yaml.safe_load(path.read_text())
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                f.keys()
    except OSError:
        return None  # unreadable (permissions ...): the loader's own error says so
    except Exception as err:  # JSONDecodeError, UnicodeDecodeError, YAMLError, SafetensorError
        return f"{type(err).__name__}: {_one_line(err)}"
    return None


def _corrupt_file(source: Any) -> tuple[Path, str] | None:
    """The first unparsable JSON/YAML/safetensors file at ``source`` (a file, or a folder and its subfolders)."""
    if source is None:
        return None
    path = Path(str(source)).expanduser()
    try:
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(f for pattern in ("*", "*/*", "*/*/*") for f in path.glob(pattern) if f.is_file())
        else:
            return None
    except OSError:
        return None
    for f in files[:500]:
        if f.suffix in (".json", ".yaml", ".yml", ".safetensors"):
            reason = _probe(f)
            if reason is not None:
                return f, reason
    return None


@contextlib.contextmanager
def _reading(what: str, source: Any) -> Iterator[None]:
    """Run a loader of ``source``; if it fails and a file there cannot be parsed, raise an error naming that file.

    The loaders (transformers, SAELens, safetensors, json) often report a truncated weights file or a broken
    ``cfg.json`` without its path; this names it.
    """
    try:
        yield
    except (RepinfLensError, FileNotFoundError, PermissionError):
        raise
    except Exception as err:
        bad = _corrupt_file(source)
        if bad is None:
            raise
        path, reason = bad
        raise CorruptFileError(
            f"Cannot load {what} {source}: {path} is corrupt or truncated ({reason}). Fix: restore that file "
            "(copy or download it again, or rerun the command that wrote it).",
            path,
        ) from err


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model name or local HF folder (default: embedded SmolLM2-135M)")
    p.add_argument(
        "--device", type=device_spec, default=None, help="cpu, cuda, cuda:1, mps (default: cuda when available)"
    )
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="parameter dtype")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed")
    p.add_argument("--n-ctx", type=positive_int, default=1024, help="context length of the HookedTransformer")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--offline", action="store_true", help="never try the Hugging Face hub for data")
    p.add_argument("--no-progress", action="store_true", help="hide tqdm bars")
    p.add_argument(
        "--template",
        default=None,
        help="prompt template: chat (default for chat models), plain, or a format string with {question} {options}",
    )


def _sae_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="openbookqa")
    p.add_argument("--train-split", default="train")
    p.add_argument("--train-limit", type=positive_int, default=1000, help="prompts whose activations train the SAE")
    p.add_argument("--architecture", default="topk", help="any SAELens training architecture (topk, standard...)")
    p.add_argument("--epochs", type=positive_float, default=8.0, help="passes over the cached activations")
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--batch-size-tokens", type=positive_int, default=1024)


def _sae_ref_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True, help="SAE folder, SAELens release or HF repo id")
    p.add_argument("--sae-id", default=None, help="SAE id inside a release / repo / folder of SAEs")
    p.add_argument("--hook", default=None, help="hook point (default: the SAE's own)")
    p.add_argument("--force-hook", action="store_true",
                   help="use --hook even though the SAE was trained at another hook")  # fmt: skip


def _split_model(args: argparse.Namespace):
    from repinf_lens.saes import load_sae, sae_hook_name
    from repinf_lens.split import SplitModel

    model = _load(args)
    with _reading("the SAE", args.sae):
        sae = load_sae(str(args.sae), args.sae_id, device=str(model.cfg.device), model=None if args.hook else model)
    if args.hook:
        from repinf_lens.saes.loading import check_sae_compatibility

        meta = getattr(sae.cfg, "metadata", None)
        own = getattr(meta, "hook_name", None)
        if args.hook not in (own, getattr(meta, "hook_name_out", None)):  # (a transcoder's output hook is its own)
            if own is not None and not getattr(args, "force_hook", False):
                raise SettingsError(
                    f"--hook {args.hook} differs from the hook the SAE was trained at, {own}: its latents would be "
                    f"read from activations it never saw. Fix: drop --hook (or pass --hook {own}), or add "
                    "--force-hook if you know the activations at both hooks are the same."
                )
            sae.cfg.metadata.hook_name = args.hook
        check_sae_compatibility(sae, model)
    return SplitModel(model, args.hook or sae_hook_name(sae), sae, task=_task(args, model))


def _queries_of(args: argparse.Namespace, attribution: Path) -> tuple[Any, list[dict]]:
    """The stored result of `attribute` and its test questions, in result order."""
    from repinf_lens.influence.result import InfluenceResult

    result = InfluenceResult.load(attribution / "result")
    rows = {str(r["id"]): dict(r) for r in _split(args, args.query_split, None)}
    missing = [q for q in result.query_ids if q not in rows]
    if missing:
        raise SystemExit(
            f"error: query ids {missing[:5]} are not in {args.dataset}/{args.query_split}. "
            "Fix: pass the --dataset/--query-split used by `attribute`."
        )
    return result, [rows[q] for q in result.query_ids]


def _sae_config(args: argparse.Namespace):
    from repinf_lens.saes import SAETrainingConfig

    return SAETrainingConfig(
        architecture=args.architecture,
        epochs=args.epochs,
        lr=args.lr,
        batch_size_tokens=args.batch_size_tokens,
        seed=args.seed,
        device=args.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu"),
    )


def _task(args: argparse.Namespace, model):
    """The task of a command. For the embedded default and the shipped finetunes it is built exactly as the demo
    and the shipped assets build it (the base model's Hugging Face tokenizer, ``max_length = --n-ctx``), so a
    shipped sketch index matches; other models use their HookedTransformer's tokenizer and BOS policy."""
    from repinf_lens.models import SHIPPED_FINETUNES, default_model_dir, is_default_model
    from repinf_lens.task import MultipleChoiceTask

    name = args.model
    if name is None or is_default_model(name) or str(name).strip().lower() in SHIPPED_FINETUNES:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
        return MultipleChoiceTask(tok, template=args.template, max_length=args.n_ctx)
    return MultipleChoiceTask.from_model(model, template=args.template)


def _flag_type(f: Any) -> Callable[[str], Any]:
    """The argparse type of a config field, from its annotation and its ``minimum`` / ``fraction`` metadata."""
    kind = str(f.type)
    meta = f.metadata
    if "int" in kind:
        return positive_int if meta.get("minimum", 0) >= 1 else nonneg_int
    if "float" in kind:
        if meta.get("fraction"):
            return fraction
        return nonneg_float if meta.get("minimum") == 0 else positive_float if "minimum" in meta else _finite_float
    return str


def add_config_flags(
    p: argparse.ArgumentParser, cls: type, *, skip: Sequence[str] = (), suppress: bool = False
) -> None:
    """One ``--flag`` per field of the config dataclass ``cls`` (help, check, choices, exclusive groups from the
    field metadata; see :func:`repinf_lens.workflows.config.config_fields`). ``suppress``: a flag not given
    leaves no attribute, so a preset (the demo's) keeps its own value."""
    from repinf_lens.curvature.solvers import get_solver_class, list_solvers  # registered solvers count
    from repinf_lens.influence.math import IG_RULES, LATENT_METHODS
    from repinf_lens.workflows.config import config_fields

    groups: dict[str, Any] = {}
    for f in config_fields(cls):
        if f.name in skip:
            continue
        meta = dict(f.metadata)
        target = p
        if meta.get("exclusive"):
            if meta["exclusive"] not in groups:
                groups[meta["exclusive"]] = p.add_mutually_exclusive_group()
            target = groups[meta["exclusive"]]
        kw: dict[str, Any] = {"help": meta["help"], "dest": f.name}
        if suppress:
            kw["default"] = argparse.SUPPRESS
        if str(f.type) == "bool":
            kw["action"] = "store_true"
        else:
            kw["type"] = _flag_type(f)
            if not suppress:
                kw["default"] = f.default
            if meta.get("choices") == "solvers":
                kw["choices"] = list_solvers()
            elif meta.get("choices") == "latent_methods":
                kw["choices"] = list(LATENT_METHODS)
            elif meta.get("choices") == "ig_rules":
                kw["choices"] = list(IG_RULES)
            elif meta.get("choices") == "factor_solvers":
                kw["choices"] = [n for n in list_solvers() if get_solver_class(n)().fits_factors]
            elif isinstance(meta.get("choices"), tuple):  # (a fixed set of values)
                kw["choices"] = list(meta["choices"])
        target.add_argument("--" + f.name.replace("_", "-"), **kw)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The config dataclass ``cls`` from the parsed flags of :func:`add_config_flags` (checked by its
    ``__post_init__``: an impossible combination fails here, before any model is loaded)."""
    from repinf_lens.workflows.config import config_fields

    return cls(**{f.name: getattr(args, f.name) for f in config_fields(cls) if hasattr(args, f.name)})


def _attribution_args(p: argparse.ArgumentParser) -> None:
    from repinf_lens.workflows.config import AttributionConfig

    add_config_flags(p, AttributionConfig, skip=("batch_size",))  # --batch-size is a common flag


def _attribution_config(args: argparse.Namespace):
    from repinf_lens.workflows.config import AttributionConfig

    return config_from_args(AttributionConfig, args)


def _split(args: argparse.Namespace, split: str, limit: int | None):
    from repinf_lens.data import load_mcqa

    ds = load_mcqa(args.dataset, split, offline=True if args.offline else None)
    return ds.select(range(min(limit, len(ds)))) if limit is not None else ds


def build_parser() -> argparse.ArgumentParser:
    """The ``repinf-lens`` argument parser: one subcommand per pipeline stage (see ``docs/cli.md``)."""
    parser = _Parser(prog="repinf-lens", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="zero-shot accuracy of a model on an MCQA split")
    _common(ev)
    ev.add_argument("--dataset", default="openbookqa")
    ev.add_argument("--split", default="test")
    ev.add_argument("--limit", type=positive_int, default=None, help="only the first N questions")
    ev.add_argument("--out", type=Path, default=None, help="write a JSON record of the run here")
    fin = sub.add_parser("finetune", help="LoRA-finetune a model on an MCQA training split (peft), merge, evaluate")
    _common(fin)
    fin.add_argument("--dataset", default="openbookqa")
    fin.add_argument("--train-split", default="train")
    fin.add_argument("--eval-split", default="test")
    fin.add_argument("--train-limit", type=positive_int, default=None, help="only the first N training examples")
    fin.add_argument("--eval-limit", type=positive_int, default=None, help="only the first N evaluation questions")
    fin.add_argument("--epochs", type=positive_float, default=4.0)
    fin.add_argument("--lr", type=positive_float, default=2e-4)
    fin.add_argument("--effective-batch-size", type=positive_int, default=32, help="batch reached by accumulation")
    fin.add_argument("--lora-r", type=positive_int, default=16)
    fin.add_argument(
        "--lora-layers",
        type=_block_range,
        default=None,
        help="blocks that get LoRA, e.g. 24-29 or 20,22 (default: all); upper ones train fastest",
    )
    fin.add_argument("--autocast", choices=["bf16"], default=None, help="bf16 autocast (fast on AVX512-BF16 CPUs)")
    fin.add_argument("--checkpoint-every", type=positive_int, default=50, help="optimizer steps between checkpoints")
    fin.add_argument("--out", type=Path, default=Path("runs/finetune"), help="output directory")
    mg = sub.add_parser(
        "merge-adapter", help="merge a LoRA adapter trained elsewhere (e.g. on a GPU) into its base model"
    )
    _common(mg)
    mg.add_argument("--adapter", type=Path, required=True, help="peft adapter folder (finetune's OUT/adapter)")
    mg.add_argument("--out", type=Path, required=True, help="output folder: OUT/merged is the merged HF model")
    ex = sub.add_parser(
        "export-adapter", help="ship a finished finetune: fp16 adapter + provenance, accuracy measured on it"
    )
    _common(ex)
    ex.add_argument("--run", type=Path, required=True, help="finetune output folder (adapter/, finetune.json)")
    ex.add_argument("--out", type=Path, required=True, help="output folder (e.g. repinf_lens/assets/finetunes/X)")
    ex.add_argument("--dataset", default="openbookqa")
    ex.add_argument("--eval-split", default="test")
    ex.add_argument("--eval-limit", type=positive_int, default=None, help="only the first N evaluation questions")
    ex.add_argument("--slice", type=positive_int, default=100, help="questions whose predictions are recorded")
    ts = sub.add_parser("train-sae", help="train one SAE (SAELens trainer, any architecture) on task activations")
    _common(ts)
    _sae_args(ts)
    ts.add_argument("--hook", required=True, help="hook point, e.g. blocks.15.hook_resid_post")
    ts.add_argument("--d-sae", type=positive_int, default=2048)
    ts.add_argument("--k", type=positive_int, default=64, help="active latents (TopK architectures)")
    ts.add_argument("--out", type=Path, default=Path("runs/sae"), help="output SAE folder (SAELens format)")
    sw = sub.add_parser("sweep", help="layer sweep: an SAE per (layer, size), accuracy cost, layer selection")
    _common(sw)
    _sae_args(sw)
    sw.add_argument("--layers", type=nonneg_int, nargs="*", default=None,
                    help="layers (default: spread over middle half)")  # fmt: skip
    sw.add_argument("--n-layers", type=positive_int, default=5, help="how many middle-half layers without --layers")
    sw.add_argument("--sizes", type=sae_size, nargs="+", default=[(2048, 64), (512, 64)],
                    help="d_sae x k pairs, e.g. 2048x64")  # fmt: skip
    sw.add_argument("--hook-template", default="blocks.{layer}.hook_resid_post")
    sw.add_argument("--eval-split", default="test")
    sw.add_argument("--eval-limit", type=positive_int, default=200, help="questions for the accuracy change")
    sw.add_argument("--out", type=Path, default=Path("runs/sweep"), help="output directory")
    ort = sub.add_parser("orthogonality", help="orthogonality of token embeddings, activations and SAE latents")
    _common(ort)
    ort.add_argument("--sae", required=True, help="SAE folder, SAELens release or HF repo")
    ort.add_argument("--sae-id", default=None)
    ort.add_argument("--dataset", default="openbookqa")
    ort.add_argument("--split", default="test")
    ort.add_argument("--limit", type=positive_int, default=200, help="prompts to read tokens from")
    ort.add_argument("--max-tokens", type=positive_int, default=4096)
    ort.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    at = sub.add_parser("attribute", help="influence of training examples, SAE latents and tokens on test questions")
    _common(at)
    _sae_ref_args(at)
    at.add_argument("--dataset", default="openbookqa")
    at.add_argument("--train-split", default="train")
    at.add_argument("--train-limit", type=positive_int, default=None, help="only the first N training examples")
    at.add_argument("--query-split", default="test")
    at.add_argument("--query-limit", type=positive_int, default=3, help="the first N test questions")
    at.add_argument("--query-ids", nargs="*", default=None, help="explicit test question ids (override the limit)")
    _attribution_args(at)
    at.add_argument("--out", type=Path, default=Path("runs/attribute"), help="output directory")
    fa = sub.add_parser(
        "faithfulness", help="per-question attribution + necessity/sufficiency over many questions, with verdicts"
    )
    _common(fa)
    _sae_ref_args(fa)
    fa.add_argument("--dataset", default="openbookqa")
    fa.add_argument("--train-split", default="train")
    fa.add_argument(
        "--train-limit", type=positive_int, default=None, help="the training examples prefiltered (first N)"
    )
    fa.add_argument("--query-split", default="test")
    fa.add_argument("--query-limit", type=positive_int, default=50, help="the first N test questions")
    fa.add_argument("--rankings", nargs="+", default=list(_DEFAULT_RANKINGS), help=_RANKINGS_HELP)
    fa.add_argument("--ks", nargs="+", type=nonneg_int, default=None, help="default: the paper's 10 25 50 ... 200")
    fa.add_argument("--n-boot", type=nonneg_int, default=1000)
    fa.add_argument(
        "--shard", type=shard_spec, default=None,
        help="I/N: handle questions I, I+N, ... so N processes share --out (e.g. 0/2, 1/2)",
    )  # fmt: skip
    _attribution_args(fa)
    fa.add_argument("--out", type=Path, default=Path("runs/faithfulness"), help="output directory")
    cs = sub.add_parser(
        "case-studies", help="test questions fixed by finetuning: top examples, latents, tokens, rationale variant"
    )
    _common(cs)
    _sae_ref_args(cs)
    cs.add_argument("--base-model", default=None, help="the model before finetuning (default: embedded SmolLM2)")
    cs.add_argument("--dataset", default="openbookqa")
    cs.add_argument("--train-split", default="train")
    cs.add_argument("--train-limit", type=positive_int, default=None, help="the training examples attributed (first N)")
    cs.add_argument("--eval-split", default="test")
    cs.add_argument("--eval-limit", type=positive_int, default=200, help="test questions searched for cases (first N)")
    cs.add_argument("--n-cases", type=positive_int, default=3)
    cs.add_argument("--top-examples", type=positive_int, default=5)
    cs.add_argument("--top-latents", type=positive_int, default=5)
    _attribution_args(cs)
    cs.add_argument("--out", type=Path, default=Path("runs/case_studies"), help="output directory")
    ab = sub.add_parser("ablate", help="necessity / sufficiency of the top-k latents per ranking")
    _common(ab)
    _sae_ref_args(ab)
    ab.add_argument("--attribution", type=Path, required=True, help="output directory of `attribute`")
    ab.add_argument("--dataset", default="openbookqa")
    ab.add_argument("--query-split", default="test")
    ab.add_argument("--rankings", nargs="+", default=list(_DEFAULT_RANKINGS), help=_RANKINGS_HELP)
    ab.add_argument("--ks", type=nonneg_int, nargs="+", default=None, help="default: the paper's 10 25 50 ... 200")
    ab.add_argument("--n-boot", type=nonneg_int, default=1000)
    ab.add_argument("--out", type=Path, default=Path("runs/ablate"), help="output directory")
    rp = sub.add_parser("report", help="one self-contained HTML report (heatmaps, latents, plots, tables)")
    _common(rp)
    _sae_ref_args(rp)
    rp.add_argument("--attribution", type=Path, required=True, help="output directory of `attribute`")
    rp.add_argument("--dataset", default="openbookqa")
    rp.add_argument("--query-split", default="test")
    rp.add_argument("--ablation", type=Path, default=None, help="output directory of `ablate`")
    rp.add_argument("--sweep", type=Path, default=None, help="output directory of `sweep`")
    rp.add_argument("--table", nargs=2, action="append", default=[], metavar=("TITLE", "JSON"),
                    help="add a table from a JSON list of rows (repeatable)")  # fmt: skip
    rp.add_argument("--top-examples", type=positive_int, default=5)
    rp.add_argument("--top-latents", type=positive_int, default=10)
    rp.add_argument("--out", type=Path, default=Path("runs/report.html"), help="the HTML file")
    demo = sub.add_parser(
        "demo", help="the main job: finetune, SAE, attribution, ablations and an HTML report on OpenBookQA"
    )
    _common(demo)
    demo.add_argument("--quick", action="store_true", help="the quick preset (a few minutes on 2 CPU cores)")
    demo.add_argument("--config", type=Path, default=None, help="JSON/YAML file of DemoConfig fields")
    demo.add_argument("--adapter", type=Path, default=None, help="a LoRA adapter trained elsewhere (not the shipped)")
    demo.add_argument(
        "--retrain", action="store_true",
        help="redo the shipped assets: the finetune (shipped recipe), the layer sweep and the sketch index (hours)",
    )  # fmt: skip
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    from repinf_lens.workflows.config import AttributionConfig

    add_config_flags(demo, AttributionConfig, skip=("batch_size",), suppress=True)  # given: replace the preset's
    for p in sub.choices.values():  # --debug also after the subcommand (SUPPRESS: keeps a --debug given before it)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="print the full traceback")
    return parser


def _load(args: argparse.Namespace):
    import torch

    from repinf_lens.models import load_model

    torch.manual_seed(args.seed)
    with _reading("the model", args.model):
        model = load_model(args.model, device=args.device, dtype=getattr(torch, _DTYPES[args.dtype]), n_ctx=args.n_ctx)
    return model


def _evaluate(args: argparse.Namespace, dataset: str, split: str, limit: int | None, out: Path | None) -> dict:
    from repinf_lens.data import load_mcqa
    from repinf_lens.task import MultipleChoiceTask, evaluate

    t0 = time.perf_counter()
    model = _load(args)
    t_model = time.perf_counter() - t0
    ds = load_mcqa(dataset, split, offline=True if args.offline else None)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    task = MultipleChoiceTask.from_model(model, template=args.template)
    t1 = time.perf_counter()
    acc = evaluate(model, task, ds, batch_size=args.batch_size, progress=not args.no_progress)
    record = {
        "model": args.model or "SmolLM2-135M-Instruct (embedded default)",
        "dataset": dataset,
        "split": split,
        "n_questions": len(ds),
        "accuracy": acc,
        "template": task.template,
        "device": str(model.cfg.device),
        "dtype": args.dtype,
        "seconds_model_load": round(t_model, 2),
        "seconds_evaluate": round(time.perf_counter() - t1, 2),
    }
    if out is not None:
        write_json_atomic(out, record)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``repinf-lens ARGV``; returns the exit code (0; 2 for a user error; 1 for a bug; 130 on Ctrl-C).

    Errors are printed as one line on stderr (``repinf-lens: error: ...``); ``--debug`` adds the traceback.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse: --help (0) or a one-line parse error (2), already printed
        return stop.code if isinstance(stop.code, int) else 2
    debug = bool(getattr(args, "debug", False))
    try:
        _check_device(getattr(args, "device", None))
        with _quiet_loading(bool(getattr(args, "no_progress", False))):
            return _run(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("repinf-lens: interrupted", file=sys.stderr)
        return 130
    except SystemExit as stop:  # raise SystemExit("error: ...") in a subcommand is a user error
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        if debug:
            traceback.print_exc()
        print(f"repinf-lens: error: {_one_line(stop.code).removeprefix('error: ')}", file=sys.stderr)
        return 2
    except Exception as err:
        if debug:
            traceback.print_exc()
        return _report(err, debug=debug)


@contextlib.contextmanager
def _quiet_loading(quiet: bool) -> Iterator[None]:
    """With ``--no-progress``, also hide the progress bars of transformers (loading weights) while a command runs."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


_FIXES: tuple[tuple[type[BaseException], str], ...] = (
    (FileNotFoundError, "check the path (relative paths start in the current folder)."),
    (NotADirectoryError, "check the path."),
    (IsADirectoryError, "pass a file, not a folder."),
    (PermissionError, "check the file permissions, or pick another --out folder."),
    (ConnectionError, "check the network connection, or pass --offline to use only cached data."),
    (TimeoutError, "check the network connection, or pass --offline to use only cached data."),
)


def _user_error(err: BaseException) -> str | None:
    """The one-line message of a user error, or ``None`` for what looks like a bug in repinf-lens."""
    import torch

    msg = _one_line(err)
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return (
            f"out of GPU memory ({msg[:200]}). Fix: lower --batch-size or --query-chunk-size, a smaller "
            "--sketch-dim, or --device cpu."
        )
    if isinstance(err, KeyError):
        key = err.args[0] if err.args else ""
        text = key if isinstance(key, str) and " " in key else f"{key!r} was not found"
        return f"{_one_line(text)} (a name or id that does not exist; --debug shows where it was looked up)"
    from repinf_lens._cache import OfflineAssetError

    if "Fix:" in msg or isinstance(err, (RepinfLensError, ValueError, OfflineAssetError)):
        return msg or type(err).__name__
    if isinstance(err, OSError):
        fix = next((f for cls, f in _FIXES if isinstance(err, cls)), None)
        return f"{msg or type(err).__name__}" + (f". Fix: {fix}" if fix else "")
    return None


def _report(err: Exception, *, debug: bool) -> int:
    """Print ``err`` as one line on stderr; exit code 2 for user errors, 1 for bugs."""
    msg = _user_error(err)
    if msg is not None:
        print(f"repinf-lens: error: {msg}", file=sys.stderr)
        return 2
    hint = "the traceback is above" if debug else "rerun with --debug for the traceback"
    print(
        f"repinf-lens: internal error: {type(err).__name__}: {_one_line(err)} (this looks like a bug in "
        f"repinf-lens: {hint}, and please report it with the command line)",
        file=sys.stderr,
    )
    return 1


def _cmd_evaluate(args: argparse.Namespace) -> int:
    """``repinf-lens evaluate``: a model's accuracy on a split (JSON on stdout; ``--out`` also writes it)."""
    rec = _evaluate(args, args.dataset, args.split, args.limit, args.out)
    print(json.dumps(rec, indent=2))
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    """``repinf-lens finetune``: LoRA-finetune on a split; prints the run's metadata (no loss curve)."""
    import torch

    from repinf_lens.task import MultipleChoiceTask
    from repinf_lens.workflows.finetuning import finetune

    torch.manual_seed(args.seed)
    train = _split(args, args.train_split, args.train_limit)
    ev = _split(args, args.eval_split, args.eval_limit)
    from transformers import AutoTokenizer

    from repinf_lens.models import default_model_dir, is_default_model

    folder = default_model_dir() if is_default_model(args.model) else args.model
    task = MultipleChoiceTask(AutoTokenizer.from_pretrained(str(folder)), max_length=args.n_ctx, template=args.template)
    res = finetune(
        args.model,
        task,
        train,
        out_dir=args.out,
        eval_dataset=ev,
        device=args.device,
        n_ctx=args.n_ctx,
        progress=not args.no_progress,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.effective_batch_size,
        micro_batch_size=args.batch_size,
        lora_r=args.lora_r,
        lora_layers=args.lora_layers,
        autocast=args.autocast,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )
    meta = {k: v for k, v in res.metadata.items() if k != "loss_curve"}
    print(json.dumps(meta, indent=2))
    return 0


def _cmd_merge_adapter(args: argparse.Namespace) -> int:
    """``repinf-lens merge-adapter``: merge a LoRA adapter into its base model and save the merged model."""
    from repinf_lens.workflows.finetuning import merge_adapter

    with _reading("the adapter", args.adapter), _reading("the model", args.model):
        model = merge_adapter(args.model, args.adapter, args.out, device=args.device, n_ctx=args.n_ctx)
    print(json.dumps({"merged": str(args.out / "merged"), "n_layers": model.cfg.n_layers}, indent=2))
    return 0


def _cmd_export_adapter(args: argparse.Namespace) -> int:
    """``repinf-lens export-adapter``: ship a finetune run's adapter (with its evaluation) into a folder."""
    from transformers import AutoTokenizer

    from repinf_lens.models import default_model_dir
    from repinf_lens.task import MultipleChoiceTask
    from repinf_lens.workflows.finetuning import ship_finetune

    run_cfg = json.loads((args.run / "finetune.json").read_text())
    tcfg = run_cfg.get("task_config") or {}
    tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    task = MultipleChoiceTask(tok, template=args.template or tcfg.get("template"), max_length=args.n_ctx)
    rec = ship_finetune(
        args.run,
        args.out,
        task,
        _split(args, args.eval_split, args.eval_limit),
        eval_name=args.eval_split,
        dataset=args.dataset,
        slice_size=args.slice,
        command="repinf-lens " + " ".join(sys.argv[1:]) if sys.argv[1:] else None,
        device=args.device,
        n_ctx=args.n_ctx,
        progress=not args.no_progress,
    )
    print(json.dumps({k: rec[k] for k in ("adapter_sha256", args.eval_split) if k in rec}, indent=2))
    return 0


def _cmd_train_sae(args: argparse.Namespace) -> int:
    """``repinf-lens train-sae``: collect activations at one hook and train an SAE on them."""
    from repinf_lens.saes import collect_activations, train_sae

    model = _load(args)
    task = _task(args, model)
    store = collect_activations(
        model,
        task,
        _split(args, args.train_split, args.train_limit),
        [args.hook],
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    res = train_sae(
        store,
        args.hook,
        out_dir=args.out,
        config=_sae_config(args),
        d_sae=args.d_sae,
        k=args.k,
        metadata={"dataset": args.dataset, "model_path": str(args.model)},
        progress=not args.no_progress,
    )
    print(json.dumps({"path": str(res.path), "reused": res.reused, **res.stats}, indent=2))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    """``repinf-lens sweep``: train SAEs over a layer sweep and print the table and the selected hook point."""
    from repinf_lens.saes import layer_sweep

    sizes = list(args.sizes)  # (d_sae, k) pairs, checked by sae_size when parsed
    model = _load(args)
    res = layer_sweep(
        model,
        _task(args, model),
        _split(args, args.train_split, args.train_limit),
        _split(args, args.eval_split, args.eval_limit),
        out_dir=args.out,
        layers=args.layers,
        n_layers=args.n_layers,
        sizes=sizes,
        hook_template=args.hook_template,
        sae_config=_sae_config(args),
        max_train_examples=None,
        max_eval_examples=None,
        batch_size=args.batch_size,
        metadata={"dataset": args.dataset, "model_path": str(args.model)},
        progress=not args.no_progress,
    )
    cols = ("point", "in_middle_half", "accuracy_change_no_error", "accuracy_change_with_error")
    for row in res.table:
        print("  ".join(f"{c}={row[c]:.4f}" if isinstance(row[c], float) else f"{c}={row[c]}" for c in cols))
    print(f"selected: {res.selected['point']}  best overall: {res.best_overall['point']}  files: {res.out_dir}")
    return 0


def _cmd_orthogonality(args: argparse.Namespace) -> int:
    """``repinf-lens orthogonality``: an SAE's orthogonality table (JSON on stdout; ``--out`` also writes it)."""
    from repinf_lens.analysis import orthogonality_table
    from repinf_lens.saes import load_sae

    model = _load(args)
    with _reading("the SAE", args.sae):
        sae = load_sae(args.sae, args.sae_id, model=model)
    task = _task(args, model)
    rows = _split(args, args.split, args.limit)
    batch = task.collate(list(rows))
    table = orthogonality_table(
        model,
        sae,
        batch.tokens,
        attention_mask=batch.attention_mask,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
    )
    if args.out is not None:
        write_json_atomic(args.out, table)
    print(json.dumps(table, indent=2))
    return 0


def _cmd_attribute(args: argparse.Namespace) -> int:
    """``repinf-lens attribute``: attribute queries to training examples (prefilter, s_test, resumable shards)."""
    from repinf_lens.workflows import run_attribution

    split = _split_model(args)
    queries = list(_split(args, args.query_split, None if args.query_ids else args.query_limit))
    if args.query_ids:
        by_id = {str(r["id"]): dict(r) for r in queries}
        unknown = [q for q in args.query_ids if q not in by_id]
        if unknown:
            raise SettingsError(
                f"Unknown query ids {unknown[:5]} in {args.dataset}/{args.query_split}. Fix: pass ids of that "
                "split (its `id` column), or --query-limit N for the first N questions."
            )
        queries = [by_id[q] for q in args.query_ids]
    result, _ = run_attribution(
        split, queries, _split(args, args.train_split, args.train_limit), out_dir=args.out,
        config=_attribution_config(args), progress=not args.no_progress,
    )  # fmt: skip
    for q, qid in enumerate(result.query_ids):
        top = result.top_examples(q, k=3)
        print(f"query {qid}: top proponents {top}")
    print(f"result: {args.out / 'result'}")
    return 0


def _cmd_faithfulness(args: argparse.Namespace) -> int:
    """``repinf-lens faithfulness``: compare influence rankings against baselines (paired bootstrap verdicts)."""
    from repinf_lens.workflows.faithfulness import run_faithfulness

    split = _split_model(args)
    summary = run_faithfulness(
        split, list(_split(args, args.query_split, args.query_limit)),
        _split(args, args.train_split, args.train_limit), out_dir=args.out, config=_attribution_config(args),
        rankings=args.rankings, ks=args.ks, n_boot=args.n_boot, seed=args.seed, progress=not args.no_progress,
        shard=args.shard,
    )  # fmt: skip
    if summary.get("pending"):
        print(f"shard done; {len(summary['pending'])} questions pending in other processes (the last aggregates)")
    for v in summary["verdicts"]:
        counts = ", ".join(f"{k} {v.get(k, 0)}" for k in ("better", "tie", "worse"))
        err = "with" if v["error_term"] else "without"
        print(f"{args.rankings[0]} vs {v['baseline']}, {v['mode']} {v['metric']} ({err} error term): {counts} (of ks)")
    print(f"files: {args.out}")
    return 0


def _cmd_case_studies(args: argparse.Namespace) -> int:
    """``repinf-lens case-studies``: why finetuning fixed these answers (predictions, attribution, report)."""
    from repinf_lens.analysis.case_studies import cached_predictions, prediction_record
    from repinf_lens.models import load_model
    from repinf_lens.workflows.case_studies import run_case_studies

    split = _split_model(args)
    rows = [dict(r) for r in _split(args, args.eval_split, args.eval_limit)]
    key = {"template": split.task.template, "ids": [str(r["id"]) for r in rows]}
    progress = not args.no_progress

    def base_record() -> dict:
        with _reading("the base model", args.base_model):
            base = load_model(args.base_model, device=args.device, n_ctx=args.n_ctx)
        return prediction_record(base, split.task, rows, batch_size=args.batch_size, progress=progress)

    from repinf_lens._fingerprint import model_source_digest
    from repinf_lens.influence.result import InfluenceResult, check_split_matches

    previous = args.out / "attribution" / "result"
    if (previous / "result.json").is_file():  # a rerun into a folder that holds an attribution
        check_split_matches(InfluenceResult.load(previous), split, directory=previous)
    before = cached_predictions(
        args.out / "eval_base.json",
        {**key, "model": str(args.base_model), "weights": model_source_digest(args.base_model)},
        base_record,
    )
    after = cached_predictions(
        args.out / "eval_finetuned.json",
        {**key, "model": str(args.model), "weights": split.fingerprint()["model_weights"]},
        lambda: prediction_record(split.model, split.task, rows, batch_size=args.batch_size, progress=progress),
    )
    summary = run_case_studies(
        split, rows, _split(args, args.train_split, args.train_limit), out_dir=args.out,
        predictions_before=before, predictions_after=after, n_cases=args.n_cases,
        config=_attribution_config(args), top_examples=args.top_examples, top_latents=args.top_latents,
        progress=progress,
    )  # fmt: skip
    print(
        f"accuracy on {len(rows)} questions: {100 * before['accuracy']:.1f} % before -> "
        f"{100 * after['accuracy']:.1f} % after finetuning"
    )
    for c in summary["cases"]:
        aug = c["augmentation"]
        print(
            f"case {c['query']} ({c['why']}): top example {c['top_examples'][0]['id']} "
            f"{c['top_examples'][0]['score']:+.4g}; with a rationale {aug['score']:+.4g} -> "
            f"{aug['score_with_rationale']:+.4g}"
        )
    print(f"report: {summary['report']}")
    return 0


def _finished_attribution(args: argparse.Namespace):
    """``(split, result, queries)`` of ``--attribution``, its result checked against the split built here."""
    from repinf_lens.influence.result import check_split_matches

    split = _split_model(args)
    result, queries = _queries_of(args, args.attribution)
    check_split_matches(result, split, directory=args.attribution / "result")
    return split, result, queries


def _cmd_ablate(args: argparse.Namespace) -> int:
    """``repinf-lens ablate``: ablate the top latents of a finished attribution and aggregate the effects."""
    from repinf_lens.workflows import run_ablation

    split, result, queries = _finished_attribution(args)
    _, agg, files = run_ablation(
        split, queries, result, out_dir=args.out, rankings=list(args.rankings), ks=args.ks, n_boot=args.n_boot,
        seed=args.seed, progress=not args.no_progress,
    )  # fmt: skip
    print(f"{len(agg)} aggregate rows; files: {', '.join(str(p) for p in files.values())}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    """``repinf-lens report``: the HTML report of a finished attribution."""
    from repinf_lens.workflows import make_report

    split, result, queries = _finished_attribution(args)
    tables = {}
    for title, path in args.table:
        with _reading("the --table file", path):
            tables[title] = json.loads(Path(path).read_text())
    path = make_report(
        args.out, split=split, queries=queries, result=result,
        ablation_plot=args.ablation / "ablation.png" if args.ablation else None,
        sweep_plot=args.sweep / "sweep.png" if args.sweep else None,
        tables=tables, top_examples=args.top_examples, top_latents=args.top_latents,
    )  # fmt: skip
    print(f"report: {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """``repinf-lens demo``: the end-to-end demo (shipped assets by default; ``--retrain`` redoes them)."""
    from repinf_lens.workflows.demo import DemoConfig, run_demo

    if args.config is not None:
        with _reading("the --config file", args.config):
            cfg = DemoConfig.from_file(args.config, quick=args.quick)
    else:
        cfg = DemoConfig.quick() if args.quick else DemoConfig()
    from repinf_lens.workflows.config import AttributionConfig, config_fields

    # the attribution flags given (the common --batch-size always is) replace the preset's fields
    given = {f.name: getattr(args, f.name) for f in config_fields(AttributionConfig) if hasattr(args, f.name)}
    cfg = DemoConfig.build(cfg, **given, seed=args.seed)
    if args.template is not None:
        cfg = dataclasses.replace(cfg, template=args.template)
    if args.adapter is not None:
        cfg = dataclasses.replace(cfg, adapter=str(args.adapter))
    if args.retrain:
        cfg = dataclasses.replace(cfg, retrain=True)
    res = run_demo(
        args.out, cfg, model=args.model, offline=True if args.offline else None, device=args.device,
        n_ctx=args.n_ctx, progress=not args.no_progress,
    )  # fmt: skip
    s = res.summary
    print(
        f"\naccuracy on {s['n_eval']} test questions: {100 * s['accuracy_zero_shot']:.1f} % zero-shot -> "
        f"{100 * s['accuracy_finetuned']:.1f} % after LoRA; SAE {s['sae']}; "
        f"{s['timings']['total_s']:.0f} s, peak RSS {s['peak_rss_mb'] / 1024:.1f} GB. Report: {res.report}"
    )
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "evaluate": _cmd_evaluate,
    "finetune": _cmd_finetune,
    "merge-adapter": _cmd_merge_adapter,
    "export-adapter": _cmd_export_adapter,
    "train-sae": _cmd_train_sae,
    "sweep": _cmd_sweep,
    "orthogonality": _cmd_orthogonality,
    "attribute": _cmd_attribute,
    "faithfulness": _cmd_faithfulness,
    "case-studies": _cmd_case_studies,
    "ablate": _cmd_ablate,
    "report": _cmd_report,
    "demo": _cmd_demo,
}


def _run(args: argparse.Namespace) -> int:
    """Run the subcommand ``args.command`` (its handler in :data:`_COMMANDS`); returns its exit code."""
    handler = _COMMANDS.get(args.command)
    if handler is None:  # pragma: no cover - argparse enforces a subcommand
        return 2
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
