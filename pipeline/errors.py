"""Error classes and the exit codes they map to (documented in README "Failure modes").

Every error a user can cause ends the command with one line on stderr and one of these codes:

====  =====================  ==========================================================
code  class                  meaning
====  =====================  ==========================================================
2     UsageError             bad option or setting (click's own usage errors use 2 too)
3     DataError              an input file or dataset is malformed or inconsistent
4     IntegrityError         provenance/hash mismatch, stale input, incomplete artifact
5     RuntimeUnavailable     the requested execution provider or device cannot run
6     BusyError              another writer holds the output
7     ResourceError          out of resources: a write failed (disk full, file-size limit,
                             quota, read-only or unwritable folder, I/O error), the disk
                             cannot hold what a stage will write, or memory ran out
8     NothingFits            no model meets the budgets of ``distill bench pick``
130   Interrupted            Ctrl-C (SIGINT); the line says what was kept
====  =====================  ==========================================================

Code 7 says "nothing is wrong with your inputs or settings; the machine ran out": a script can free
space (or memory) and rerun the same command, which resumes where the stage can (the cache, the
teacher's members and epochs, a student's epochs) and starts over where it cannot, never from a
half-written file.
"""
from __future__ import annotations


class PipelineError(Exception):
    """Base class: a user-facing failure with a one-line message and an exit code."""

    exit_code = 1


class UsageError(PipelineError):
    exit_code = 2


class DataError(PipelineError):
    exit_code = 3


class IntegrityError(PipelineError):
    exit_code = 4


class RuntimeUnavailable(PipelineError):
    exit_code = 5


class BusyError(PipelineError):
    exit_code = 6


class ResourceError(PipelineError):
    exit_code = 7


class NothingFits(PipelineError):
    exit_code = 8


class Interrupted(PipelineError):
    """Ctrl-C, as a stage words it when it has something to say (what was kept, how a rerun resumes);
    the command line answers a bare KeyboardInterrupt with the same exit code."""

    exit_code = 130
