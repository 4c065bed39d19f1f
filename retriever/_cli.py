"""What every command-line job shares: the model flags, the one retriever loader, and the error convention."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from retriever.errors import RetrieverError
from retriever.models.config import DTYPE_NAMES, QUANTIZATIONS

EXIT_USAGE = 2  # argparse's own code for a bad flag; every user mistake exits with it


def add_model_args(parser: argparse.ArgumentParser, required: bool = True, help_model: str = "") -> None:
    """--model, --adapter, --quantization, --device and --dtype, declared once for every job."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=required, help=help_model or "base model: hub id or folder")
    group.add_argument("--adapter", help="trained adapter folder (LoRA, DoRA or QLoRA)")
    group.add_argument(
        "--quantization", choices=QUANTIZATIONS, default="none", help="load the base in 4-bit NF4 or 8-bit"
    )
    group.add_argument("--device", help="cpu, cuda, cuda:1, mps ... (default: cuda when present)")
    group.add_argument(
        "--dtype", choices=DTYPE_NAMES, help="compute dtype (default: bf16 on GPU, fp32 on CPU)"
    )


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The load_retriever keyword arguments named by add_model_args' flags."""
    return {
        "model": args.model,
        "adapter": args.adapter,
        "quantization": args.quantization,
        "device": args.device,
        "dtype": getattr(args, "dtype", None),
    }


def load_retriever(**kwargs: Any) -> Any:
    """The one place a job loads a retriever; tests replace it (monkeypatch `retriever._cli.load_retriever`)."""
    from retriever.models.encoder import load_retriever as load  # lazy: transformers is heavy

    return load(**kwargs)


def retriever_from_args(args: argparse.Namespace, **overrides: Any) -> Any:
    """Load the retriever that add_model_args' flags describe."""
    return load_retriever(**{**model_kwargs(args), **overrides})


def quiet_faiss_loader() -> None:
    """faiss logs its loader probing ("Could not load library with AVX512 support") as INFO: keep it quiet."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)`; a user mistake becomes `error: <message>` on stderr and exit code 2, not a traceback."""
    quiet_faiss_loader()
    try:
        return int(main(argv) or 0)
    except (RetrieverError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def fail(message: str) -> int:
    """Print `error: message` on stderr and return the usage exit code."""
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def retriever_factory(args: argparse.Namespace, **overrides: Any) -> Callable[[], Any]:
    """A picklable no-argument loader of the retriever the flags describe (Ray workers call it remotely)."""
    import functools

    return functools.partial(load_retriever, **{**model_kwargs(args), **overrides})
