"""``python -m tests.throttled_cli SECONDS ARGS...``: the ``distill`` CLI with the cache's teachers slowed
by SECONDS per batch, so that a test (or scripts/gpu_cache_check.sh) can kill a run at a chosen
committed row.  A test hook that lives in the tests, not in the stage: production code has none.

With ``THROTTLED_CLI_ROWS=FILE`` in the environment, the first row of every batch the teachers run is
appended to FILE, one per line: what a rerun really computes, beside what its log says."""
import os
import sys
import time

from stages.cache import teachers


def main(argv: list[str]) -> None:
    delay = float(argv[0])
    call = teachers.Teachers.__call__
    rows = os.environ.get("THROTTLED_CLI_ROWS")

    def slow(self, x, first_row):
        time.sleep(delay)
        if rows:
            with open(rows, "a") as f:
                f.write(f"{first_row}\n")
        return call(self, x, first_row)

    teachers.Teachers.__call__ = slow
    from commands.main import main as cli

    cli(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
