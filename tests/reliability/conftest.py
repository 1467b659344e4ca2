"""Fixtures of the reliability tests: the tiny random BERT of the client tests."""

from tests.clients.conftest import tiny_bert

__all__ = ["tiny_bert"]
