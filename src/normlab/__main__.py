"""``python -m normlab ...``: the ``normlab`` command (for example where the console script is not
on PATH, or with ``python -m torch.distributed.run``)."""
from normlab.cli import main

if __name__ == "__main__":
    main()
