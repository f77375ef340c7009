"""``python -m tests.throttled_cli SECONDS ARGS...``: the ``distill`` CLI with the cache's teachers slowed
by SECONDS per batch, so that a test (or scripts/gpu_cache_check.sh) can kill a run at a chosen
committed row.  A test hook that lives in the tests, not in the stage: production code has none."""
import sys
import time

from stages.cache import teachers


def main(argv: list[str]) -> None:
    delay = float(argv[0])
    call = teachers.Teachers.__call__

    def slow(self, x, first_row):
        time.sleep(delay)
        return call(self, x, first_row)

    teachers.Teachers.__call__ = slow
    from pipeline.cli import main as cli

    cli(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
