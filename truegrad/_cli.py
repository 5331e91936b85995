"""The ``truegrad-lightning`` entry point, outside ``truegrad_lightning`` so that it can
run without the ``lightning`` extra: then it prints the one-line message that ``import
truegrad_lightning`` raises (which extra to install) and exits with status 1, instead of a
traceback. With the extra installed it is :func:`truegrad_lightning.cli.main`."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    """``truegrad-lightning``: :func:`truegrad_lightning.cli.main`, or one line naming the
    missing optional dependency (exit status 1)."""
    try:
        from truegrad._optional import require

        require("lightning.pytorch", "lightning", purpose="the truegrad-lightning command")
        require("jsonargparse", "lightning", purpose="the truegrad-lightning command")
        from truegrad_lightning.cli import main as cli_main
    except ModuleNotFoundError as error:
        print(f"truegrad-lightning: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    cli_main()


if __name__ == "__main__":  # pragma: no cover
    main()
