"""``python -m carso_cli`` (and ``torchrun -m carso_cli …``)."""

from carso_cli.cli import main

if __name__ == "__main__":
    main()
