"""The fuzz suite (issue 16): hypothesis draws bad and extreme inputs for every public entry point, and each call
must return the float64 reference's answer or raise a named attnkit error (rules: :mod:`tests.fuzz._check`).

Run it::

    pytest tests/fuzz                          # fuzz-ci: derandomized, >= 2,000 cases, no shrinking
    ATTNKIT_FUZZ_SHRINK=1 pytest tests/fuzz    # the same draw, failures shrunk to a minimal example
    ATTNKIT_FUZZ=deep pytest tests/fuzz        # fuzz-deep: >= 20,000 random cases, shrinking, compiled flex
    ATTNKIT_FUZZ_COLLECT=f.jsonl pytest tests/fuzz   # record failures in f.jsonl and keep going (a census)

The number of cases executed per test is printed at the end of the session.
"""
