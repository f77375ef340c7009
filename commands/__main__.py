"""``python -m commands ARGS``: the ``distill`` command (also under ``torchrun -m commands``)."""
from commands.main import main

if __name__ == "__main__":
    main()
