"""Shared generators of test data and run helpers for the tests and the experiments (never used by the
package's own commands)."""
