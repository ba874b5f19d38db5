"""Helpers the tests share (waiting, ...), imported by tests rather than from conftest or other test modules."""
