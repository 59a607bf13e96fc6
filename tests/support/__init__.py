"""Helpers the tests share: fakes, in-process servers, builders of test inputs (no tests here)."""
