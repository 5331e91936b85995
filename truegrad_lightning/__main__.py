"""``python -m truegrad_lightning``: the ``truegrad-lightning`` command."""

from truegrad_lightning.cli import main

if __name__ == "__main__":
    main()
