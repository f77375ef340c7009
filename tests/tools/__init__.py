"""Tools that check the tests themselves, run by hand (pytest collects nothing here):
``mutation_check.py`` plants one bug per listed test and checks that the test fails (docs/checks/mutations.md)."""
