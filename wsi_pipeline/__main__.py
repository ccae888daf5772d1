"""``python -m wsi_pipeline`` is the ``wsi-pipeline`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
